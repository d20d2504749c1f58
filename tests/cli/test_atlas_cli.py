"""``convscope atlas`` end to end (in-process), with the tiny factory model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convscope.atlas import Atlas
from convscope.cli.main import main


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A few images, one unreadable; the tiny model is importable as tinyatlas:build."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "tinycli.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 5, stride=4, padding=2), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinycli", None)
    return "tinycli:build"


def _run(folder: Path, factory: str, out: Path, *extra: str) -> int:
    return main(["atlas", str(folder), "--model", factory, "--device", "cpu", "--layers", "0",
                 "--topk", "2", "--batch-size", "3", "--crop-size", "8", "--out", str(out),
                 *extra])


def test_atlas_command_writes_a_loadable_atlas(folder, factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(folder, factory, out, "--workers", "0") == 0
    captured = capsys.readouterr()
    assert "atlas of 7 images (1 skipped)" in captured.out
    assert "images/s" in captured.err
    assert "ETA" in captured.err
    assert "bad.png" in captured.err
    atlas = Atlas.load(out)
    index, value, location = atlas.topk("0")
    assert index.shape == value.shape == (4, 2)
    assert location.shape == (4, 2, 2)
    assert (out / "index.html").exists()
    assert (out / "crops" / "0" / "3.jpg").exists()
    # Parallel loading (2 worker processes) gives the same atlas.
    assert _run(folder, factory, tmp_path / "par", "--workers", "2", "--quiet") == 0
    parallel = Atlas.load(tmp_path / "par")
    for x, y in zip(parallel.topk("0"), atlas.topk("0"), strict=True):
        np.testing.assert_array_equal(x, y)
    assert parallel.skipped == atlas.skipped


def test_atlas_command_errors(folder, factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(folder, factory, out, "--workers", "0", "--quiet") == 0
    capsys.readouterr()
    code = main(["atlas", str(folder), "--model", factory, "--layers", "0", "--topk", "3",
                 "--out", str(out), "--workers", "0", "--quiet"])
    assert code == 2
    assert "already holds a different atlas" in capsys.readouterr().err
    assert _run(folder, factory, out, "--topk", "3", "--workers", "0", "-q", "--force") == 0
    assert main(["atlas", str(folder), "--model", factory, "--layers", "nope", "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown layer 'nope'" in capsys.readouterr().err
    assert _run(folder, factory, tmp_path / "y", "--topk", "50") == 2
    assert "larger than the dataset" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(empty, factory, tmp_path / "z") == 2
    assert "holds no image" in capsys.readouterr().err
    shutil.rmtree(empty)
    assert _run(empty, factory, tmp_path / "z") == 2  # missing folder
    assert "no such dataset" in capsys.readouterr().err


def test_atlas_help_is_quick_and_lists_options():
    result = subprocess.run([sys.executable, "-m", "convscope", "atlas", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--topk", "--batch-size", "--workers", "--resume", "--force", "--device",
                   "--fused"):
        assert option in result.stdout
