"""README.md and docs/*.md as a checked map: every relative link resolves (file and heading), every
command they show parses with the parser of the program it names, every Python snippet compiles.

A command is a line of a ```bash block (continuations joined, ``&&`` chains split, comments and
elisions ``...``/``…`` dropped), or an inline code span of README's task table that starts with
``python``, ``bash`` or ``torchrun``. Parsing is argparse's check (flag names, choices, types,
counts), not a run: the commands name datasets and GPUs this machine does not have. The seed README's
commands are run for real by tests/test_seed_readme.py.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path):
    text = FENCE.sub("", page.read_text())
    for match in LINK.finditer(text):
        target = match.group(2)
        if not target.startswith(("http://", "https://", "mailto:")):
            yield target


def test_the_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "training.md", "resuming.md", "data.md", "launching.md", "performance.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_is_a_map():
    """At most ~250 lines; the quickstart first, the code map and the task table near the top."""
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Quickstart", "## Code map", "## I want to…"]
    assert "python -m pip install -r requirements.txt && python -m pytest -q tests" in text
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-1] == (
        "python -m pip install -r requirements.txt && python -m pytest -q tests")


# --- commands -----------------------------------------------------------------------------------

def shell_commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            commands.append(part.strip())
    return commands


def readme_table_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [span for span in re.findall(r"`([^`]+)`", text)
            if span.startswith(("python ", "bash ", "torchrun "))]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            if match.group(1) in ("bash", "sh", ""):
                found += [(page.name, command) for command in shell_commands(match.group(2))]
    found += [("README.md", command) for command in readme_table_commands()]
    return [(name, command) for name, command in found if re.match(r"(\w+=\S+ )*(python|bash|torchrun|flock) ", command)]


def tokens_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    words = [w for w in words if w not in ("...", "…")]
    if words[:1] == ["flock"]:  # flock -x LOCK command...
        words = words[3:]
    if words[:1] == ["env"]:
        words = words[1:]
    while words and re.match(r"\w+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_doc_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_program(program: str, argv: list[str]) -> None:
    """Parse ``argv`` as ``program`` would (argparse only); raise SystemExit on a bad command."""
    from image_classification import config
    script = Path(program).name
    if script in ("main.py", "quant_main.py"):
        config.parse_args(argv, {"quantize": True} if script == "quant_main.py" else None)
    elif script == "launch.py":
        launch = load_script("launch.py")
        _, rest, presets = launch.split_argv(argv)
        config.parse_args(rest, presets)
    elif script == "multiproc.py":
        args = load_script("multiproc.py").parse_args(argv)
        parse_program(args.training_script, list(args.training_script_args))
    elif script in ("classify.py", "model2onnx.py", "checkpoint2model.py"):
        load_script(script).build_parser().parse_args(argv)
    elif program.startswith("benchmarks/"):  # scripts of their own: every flag shown must be one they define
        source = (ROOT / program).read_text()
        unknown = [w.split("=")[0] for w in argv if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
        assert not unknown, f"{program} defines no {', '.join(unknown)}"
    else:
        raise AssertionError(f"no parser known for {program}")


def check_command(command: str) -> None:
    words = tokens_of(command)
    head = words[0]
    if head == "bash":
        assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
        return
    if head == "torchrun":  # torchrun's own options, then the training script and its flags
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        parse_program(words[script], words[script + 1:])
        return
    assert head == "python", command
    if words[1] == "-m":
        module = words[2]
        if module == "pip" or module == "pytest":
            return
        entry = importlib.import_module(module)
        if not hasattr(entry, "build_parser"):  # a package run with -m: its __main__ calls .cli
            entry = importlib.import_module(f"{module}.cli")
        entry.build_parser().parse_args(words[3:])
        return
    parse_program(words[1], words[2:])


COMMANDS = documented_commands()


def test_commands_are_found():
    assert len(COMMANDS) >= 60
    programs = {tokens_of(c)[1] if tokens_of(c)[0] == "python" else tokens_of(c)[0] for _, c in COMMANDS}
    assert {"main.py", "launch.py", "multiproc.py", "classify.py", "model2onnx.py", "-m", "bash"} <= programs


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_every_documented_command_parses(page, command):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            check_command(command)
        except SystemExit as exit:
            if exit.code not in (0, None):
                pytest.fail(f"{page}: {command}\n{stderr.getvalue().strip().splitlines()[-1:]}")


def test_a_wrong_flag_in_a_document_is_caught():
    """The check itself: a misspelt flag, an unknown recipe or script fail; a correct line passes."""
    from image_classification.errors import UserError
    check_command("python main.py --arch resnet18 --epochs 2 /data")
    check_command("torchrun --nproc_per_node 2 main.py --arch resnet18 /data")
    bad = [("python main.py --arch resnet18 --epoch-count 2 /data", SystemExit),
           ("torchrun --nproc_per_node 2 main.py --data-backend opencv /data", SystemExit),
           ("python multiproc.py --nproc_per_node 8 main.py --amp --lr fast /data", SystemExit),
           ("python launch.py --model resnet50 --precision AMP --platform DGXA100 --mode convergence --recipe nope /d",
            UserError),
           ("python -m image_classification.data.prepare --to zip a b", SystemExit),
           ("bash resnet50v1.5/training/AMP/NOPE.sh", AssertionError),
           ("python benchmarks/bench_loader_share.py --sizes 64 --frobnicate", AssertionError)]
    for command, error in bad:
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(error):
            check_command(command)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_compile(page):
    for match in FENCE.finditer(page.read_text()):
        if match.group(1) == "python":
            compile(match.group(2), f"{page.name} snippet", "exec")


PROJECT_DIRS = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {
    p.name for p in (ROOT / "image_classification").iterdir() if p.is_dir() and not p.name.startswith("_")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_source_file_named_exists(page):
    """A project file the text names in backticks (`engine/finetune.py`, `tests/test_packed.py`)
    exists, from the top of the repository or under image_classification/: a module that moves takes
    its mentions along. (Names outside the project's folders, e.g. other repositories' files, are not checked.)"""
    named = set(re.findall(r"`((?:[\w.-]+/)+[\w-]+\.(?:py|sh|yml))`", page.read_text()))
    ours = [name for name in sorted(named) if name.split("/")[0] in PROJECT_DIRS]
    missing = [name for name in ours if not (ROOT / name).exists() and not (ROOT / "image_classification" / name).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_file_check_sees_project_paths():
    named = re.findall(r"`((?:[\w.-]+/)+[\w-]+\.(?:py|sh|yml|md))`", (ROOT / "docs" / "data.md").read_text())
    assert "data/loaders/decode.py" in named and "data/loaders/decode.py".split("/")[0] in PROJECT_DIRS
