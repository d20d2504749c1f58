"""A run killed mid-way and resumed, and a 2-process torchrun (gloo) run, both end with the
atlas of one uninterrupted single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convscope.atlas import Atlas, build

LAYERS = ["0", "3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(args: list[str], factory_dir: Path, env_extra: dict[str, str] | None = None,
         torchrun: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(factory_dir), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "convscope", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _reference(factory_dir: Path, image_folder: Path, batch_size: int) -> Atlas:
    sys.path.insert(0, str(factory_dir))
    try:
        from convscope.models import load_model

        loaded = load_model("tinyatlas:build", device="cpu")
    finally:
        sys.path.remove(str(factory_dir))
    return build(loaded, image_folder, LAYERS, topk=3, batch_size=batch_size)


def _assert_same(got: Atlas, want: Atlas, exact: bool) -> None:
    assert got.images == want.images
    for layer in LAYERS:
        for x, y in zip(got.topk(layer), want.topk(layer), strict=True):
            if exact:
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_allclose(x, y, rtol=1e-6)
        np.testing.assert_array_equal(got.topk(layer)[0], want.topk(layer)[0])
        for key, value in want.stats(layer).items():
            np.testing.assert_allclose(got.stats(layer)[key], value, rtol=1e-12, err_msg=key)
        np.testing.assert_array_equal(got.histogram(layer)[0], want.histogram(layer)[0])
    np.testing.assert_array_equal(got.predictions, want.predictions)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(image_folder, factory_dir, tmp_path):
    out = tmp_path / "atlas"
    args = ["atlas", str(image_folder), "--model", "tinyatlas:build", "--layers", *LAYERS,
            "--topk", "3", "--batch-size", "3", "--workers", "0", "--no-crops", "--quiet",
            "--device", "cpu", "--out", str(out)]
    killed = _cli(args, factory_dir, {"CONVSCOPE_ATLAS_CHECKPOINT_BATCHES": "2",
                                      "CONVSCOPE_ATLAS_KILL_AFTER": "5"})
    assert killed.returncode == -9, killed.stderr
    assert (out / "checkpoint.pt").exists()
    assert not (out / "atlas.json").exists()
    resumed = _cli(["-v", *args, "--resume"], factory_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert "at image 12 of 20" in resumed.stderr
    assert not (out / "checkpoint.pt").exists()
    _assert_same(Atlas.load(out), _reference(factory_dir, image_folder, 3), exact=True)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(image_folder, factory_dir, tmp_path):
    out = tmp_path / "atlas"
    # 20 listed files, 2 shards of 10, batches of 5: the same batches as one process.
    run = _cli(["atlas", str(image_folder), "--model", "tinyatlas:build", "--layers", *LAYERS,
                "--topk", "3", "--batch-size", "5", "--workers", "0", "--device", "cpu",
                "--crop-size", "8", "--out", str(out)], factory_dir, torchrun=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 0 of 2" in run.stderr
    got = Atlas.load(out)
    assert got.meta["settings"]["processes"] == 2
    assert len(got.skipped) == 3
    assert (out / "crops" / "3" / "5.jpg").exists()
    _assert_same(got, _reference(factory_dir, image_folder, 5), exact=False)
