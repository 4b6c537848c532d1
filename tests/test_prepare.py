"""python -m image_classification.data.prepare: capped copy of an image tree."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from image_classification.data.prepare import cli as prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(path, size, fmt=None, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    save(src / "train" / "a" / "wide.jpg", (400, 300))
    save(src / "train" / "a" / "small.png", (50, 40))
    save(src / "train" / "b" / "tall.jpg", (90, 150))
    save(src / "train" / "b" / "sub" / "grey.jpg", (200, 260), mode="L")
    save(src / "val" / "a" / "palette.png", (300, 200), mode="P")
    save(src / "val" / "a" / ".hidden.jpg", (300, 200))
    (src / "train" / "b" / "bad.jpg").write_bytes(b"not an image")
    (src / "train" / "notes.txt").write_text("not an image")
    return src, tmp_path / "dst"


def run(*argv):
    return prepare.main(["-j", "1", *map(str, argv)])


def sizes(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with Image.open(path) as image:
                found[os.path.relpath(path, root)] = (image.size, image.format, image.mode)
    return found


def test_tree_is_copied_with_shorter_side_capped(tree, capsys):
    src, dst = tree
    assert run("--max-size", 100, src, dst) == 0
    assert sizes(dst) == {
        "train/a/wide.jpg": ((133, 100), "JPEG", "RGB"),      # 400x300 -> shorter side 100
        "train/a/small.png": ((50, 40), "PNG", "RGB"),        # already small: copied
        "train/b/tall.jpg": ((90, 150), "JPEG", "RGB"),       # shorter side 90 <= 100
        "train/b/sub/grey.jpg": ((100, 130), "JPEG", "L"),
        "val/a/palette.png": ((150, 100), "PNG", "RGB"),
    }
    assert (dst / "train/a/small.png").read_bytes() == (src / "train/a/small.png").read_bytes()
    assert (dst / "train/b/tall.jpg").read_bytes() == (src / "train/b/tall.jpg").read_bytes()
    out, err = capsys.readouterr()
    assert "3 resized, 2 copied" in out and "1 unreadable skipped" in out
    assert f"skipping unreadable {src / 'train/b/bad.jpg'}" in err
    assert "warning: 1 unreadable file(s) not written: train/b/bad.jpg" in err
    # the resized copy looks like the original scaled down
    original = Image.open(src / "train/b/sub/grey.jpg").resize((100, 130), Image.Resampling.LANCZOS)
    copy = Image.open(dst / "train/b/sub/grey.jpg")
    assert np.abs(np.asarray(original, np.int16) - np.asarray(copy, np.int16)).mean() < 12


def test_resume_skips_written_files_and_replaces_a_killed_runs_part(tree, capsys):
    src, dst = tree
    assert run("--max-size", 100, src, dst) == 0
    kept = dst / "train/a/wide.jpg"
    os.utime(kept, (1, 1))
    (dst / "val/a/palette.png").unlink()
    (dst / "val/a/.palette.png.part").write_bytes(b"half a file")  # left by a killed run
    capsys.readouterr()
    assert run("--max-size", 100, src, dst) == 0
    out = capsys.readouterr().out
    assert "1 resized, 0 copied" in out and "4 already there" in out
    assert os.stat(kept).st_mtime == 1  # not rewritten
    assert sizes(dst)["val/a/palette.png"] == ((150, 100), "PNG", "RGB")
    assert not [name for _, _, names in os.walk(dst) for name in names if name.endswith(".part")]


def test_an_interrupted_write_leaves_no_file(tree, monkeypatch):
    src, dst = tree
    job = prepare._Job(str(src), str(dst), 100, 90)

    def killed(image, path, **options):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        job("train/a/wide.jpg")
    assert os.listdir(dst / "train/a") == []


@pytest.mark.parametrize("argv, message", [
    (["--max-size", "0", "{src}", "{dst}"], "error: --max-size must be >= 1, got 0"),
    (["--max-size", "64", "{src}/missing", "{dst}"], "error: SRC {src}/missing does not exist"),
    (["--max-size", "64", "{src}", "{src}/train/copy"], "must not contain each other"),
    (["--max-size", "64", "{src}/train/notes.txt", "{dst}"], "is not a directory"),
    (["--max-size", "64", "--quality", "101", "{src}", "{dst}"], "error: --quality must be in 1..100, got 101"),
])
def test_bad_input_is_a_one_line_error(tree, capsys, argv, message):
    src, dst = tree
    argv = [a.format(src=src, dst=dst) for a in argv]
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(src=src, dst=dst) in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


def test_module_entry_point_and_empty_source(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "image_classification.data.prepare", "--max-size", "64",
                             str(tmp_path / "empty"), str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: no image files under {tmp_path / 'empty'}\n"
