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


def _vis_run(folder: Path, factory: str, out: Path, *extra: str) -> int:
    return _run(folder, factory, out, "--workers", "0", "--visualize", "--vis-channels", "3",
                "--vis-steps", "6", "--vis-size", "32", "--vis-batch", "2", *extra)


def _channel_means(factory: str, paths: list[Path]) -> np.ndarray:
    """Mean of channel c of layer "0" on visualisation c, computed here from the PNG files
    with the model's own normalisation (independent of convscope.visualize)."""
    import torch
    from PIL import Image

    from convscope import load_model

    model = load_model(factory, device="cpu")
    mean = torch.tensor(model.transform.mean).view(3, 1, 1)
    std = torch.tensor(model.transform.std).view(3, 1, 1)
    out = []
    for c, path in enumerate(paths):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
        x = ((pixels.permute(2, 0, 1) - mean) / std)[None]
        with torch.no_grad():
            out.append(float(model.module[0](x)[0, c].mean()))
    grey = ((torch.full((3, 32, 32), 0.5) - mean) / std)[None]
    with torch.no_grad():
        base = model.module[0](grey)[0, : len(paths)].mean(dim=(1, 2)).numpy()
    return np.array(out), base


def test_atlas_visualize_adds_channel_images_and_pages(folder, factory, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    assert _vis_run(folder, factory, out) == 0
    err = capsys.readouterr().err
    assert "atlas: visualisations" in err and "12/12" in err  # 2 batches of 6 steps, one bar
    manifest = json.loads((out / "visualizations.json").read_text())
    assert manifest["layers"]["0"]["channels"] == [0, 1, 2]  # the first 3 of 4: bounded
    paths = [out / "crops" / "0" / f"vis_{c}.png" for c in range(3)]
    assert all(p.exists() for p in paths) and not (out / "crops" / "0" / "vis_3.png").exists()
    reached, grey = _channel_means(factory, paths)
    np.testing.assert_allclose(reached, manifest["layers"]["0"]["values"], rtol=0.05, atol=0.02)
    assert (reached > grey).all()  # the optimisation raised every channel above a grey image
    page = (out / "layers" / "0.html").read_text()
    assert page.count("src='../crops/0/vis_") == 3 + 3  # the grid and one per channel row
    assert "not visualised" in page  # channel 3
    assert "Feature visualisations of the first 3 channels" in (out / "index.html").read_text()


def test_atlas_visualize_resume_keeps_finished_batches(folder, factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert _vis_run(folder, factory, out) == 0
    first = {c: (out / "crops" / "0" / f"vis_{c}.png").read_bytes() for c in range(3)}
    stamp = (out / "crops" / "0" / "vis_0.png").stat().st_mtime_ns
    capsys.readouterr()
    assert _vis_run(folder, factory, out, "--resume") == 0  # everything done: no steps
    err = capsys.readouterr().err
    assert "/6" not in err and "/12" not in err
    (out / "crops" / "0" / "vis_2.png").unlink()  # the second batch lost
    assert _vis_run(folder, factory, out, "--resume") == 0
    assert "6/6" in capsys.readouterr().err  # only that batch is redone
    assert (out / "crops" / "0" / "vis_0.png").stat().st_mtime_ns == stamp
    assert (out / "crops" / "0" / "vis_2.png").read_bytes() == first[2]  # same image again
    assert _vis_run(folder, factory, out, "--resume", "--vis-steps", "5", "--quiet") == 0
    assert "visualisations" not in capsys.readouterr().err  # other settings: redone, silently
    assert (out / "crops" / "0" / "vis_0.png").read_bytes() != first[0]


def test_atlas_visualize_flags(folder, factory, tmp_path, capsys):
    from convscope.cli import atlas as cli_atlas
    from convscope.featvis import atlas as featvis_atlas

    assert (cli_atlas.VIS_CHANNELS, cli_atlas.VIS_STEPS, cli_atlas.VIS_SIZE,
            cli_atlas.VIS_BATCH) == (featvis_atlas.DEFAULT_CHANNELS, featvis_atlas.DEFAULT_STEPS,
                                     featvis_atlas.DEFAULT_SIZE, featvis_atlas.DEFAULT_BATCH)
    for bad in ("0", "some"):
        with pytest.raises(SystemExit):
            _vis_run(folder, factory, tmp_path / "o", "--vis-channels", bad)
        assert "--vis-channels" in capsys.readouterr().err
    out = tmp_path / "all"
    assert _vis_run(folder, factory, out, "--vis-channels", "all", "--vis-steps", "2",
                    "--quiet") == 0
    assert sorted(p.name for p in (out / "crops" / "0").glob("vis_*.png")) == [
        f"vis_{c}.png" for c in range(4)]
