"""Figures of the code's shape, to compare before and after a restructuring (issue 25).

    python tools/house_figures.py            # this checkout
    python tools/house_figures.py --top 8    # more of the longest parameter lists

Prints: README lines (and lines over 200 characters), modules and lines under image_classification/,
internal import edges (module -> module, each pair once, imports inside functions included) and the
import cycles among them (strongly connected components of more than one module), the functions with
the longest parameter lists, the functions that take the whole ``flags`` namespace, and the places
outside the checkpoint owner that index a checkpoint's keys by string.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "image_classification"
# The keys a checkpoint file holds (checkpoints/contents.py writes them), and the wrapper entries of other
# projects' weights files; a subscript or .get() with one of these string literals outside the owner is a
# second reader of the format. (Not ``class_names``: ONNX metadata has one too, read in deploy/metadata.py.)
CHECKPOINT_KEYS = ("state_dict", "state_dict_ema", "ema_state_dict", "ema_updates", "optimizer", "epoch",
                   "step_in_epoch", "epoch_progress", "best_prec1", "has_best", "epochs_since_best",
                   "validation_pending", "target_epoch", "arch", "num_classes", "preprocessing",
                   "eval_preprocessing", "config", "rng", "split", "scaler", "finetune", "modelopt_state",
                   "format_version", "epoch_files", "model", "stage", "schedule")
# The checkpoint owner: the package (before issue 25, the module) and its modules.
OWNERS = ("image_classification.checkpoint", "image_classification.checkpoints")


def owned(name: str) -> bool:
    return any(name == owner or name.startswith(owner + ".") for owner in OWNERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def functions(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
            names = [n for n in names if n not in ("self", "cls")]
            yield node.name, node.lineno, names


def key_reads(path: Path) -> list[tuple[int, str]]:
    # (not ``helps.get("num_classes", ...)``: config.py's help texts are keyed by flag names)
    pattern = re.compile(r"""(?<!helps)(\[\s*|\.get\(\s*|\.pop\(\s*)["'](%s)["']""" % "|".join(CHECKPOINT_KEYS))
    hits = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if pattern.search(line):
            hits.append((number, line.strip()))
    return hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text().splitlines()
    print(f"README.md: {len(readme)} lines, {sum(len(line) > 200 for line in readme)} over 200 characters")
    found = modules()
    lines = sum(len(p.read_text().splitlines()) for p in found.values())
    print(f"{PACKAGE}: {len(found)} modules, {lines} lines")
    known = set(found)
    edges = {name: imports_of(name, path, known) for name, path in found.items()}
    # A package's __init__ importing its own submodules is not a dependency between jobs.
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in edges.items()}
    print(f"internal import edges: {sum(len(t) for t in edges.values())}")
    rings = cycles(edges)
    print(f"import cycles: {len(rings)}")
    for ring in rings:
        print(f"  {len(ring)} modules: " + ", ".join(m.removeprefix(PACKAGE + '.') for m in ring))
    signatures = [(len(names), f"{module_name(path).removeprefix(PACKAGE + '.')}.{fn}", names)
                  for path in found.values() for fn, _, names in functions(path)]
    signatures.sort(key=lambda s: -s[0])
    print("longest parameter lists:")
    for count, where, _ in signatures[: args.top]:
        print(f"  {count:3d}  {where}")
    whole_flags = sorted(where for _, where, names in signatures if "flags" in names or "args" in names)
    print(f"functions taking the whole flags/args namespace: {len(whole_flags)}")
    outside = [(name, hits) for name, path in found.items() if not owned(name)
               for hits in [key_reads(path)] if hits]
    print(f"checkpoint keys indexed outside the owner: {sum(len(h) for _, h in outside)} in {len(outside)} modules")
    for name, hits in outside:
        for number, line in hits:
            print(f"  {name.removeprefix(PACKAGE + '.')}:{number}: {line[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
