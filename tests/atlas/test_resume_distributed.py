"""A run killed mid-way and resumed, and a 2-process torchrun (gloo) run, both end with the
atlas of one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convscope.atlas import Atlas, build
from convscope.atlas.build import _merge_exports
from convscope.atlas.stats import ChannelStats

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
    args = ["atlas", str(image_folder), "--model", "tinyatlas:build", *[f for layer in LAYERS for f in ("-l", layer)],
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
    run = _cli(["atlas", str(image_folder), "--model", "tinyatlas:build", *[f for layer in LAYERS for f in ("-l", layer)],
                "--topk", "3", "--batch-size", "5", "--workers", "0", "--device", "cpu",
                "--crop-size", "8", "--out", str(out)], factory_dir, torchrun=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 0 of 2" in run.stderr
    got = Atlas.load(out)
    assert got.meta["settings"]["processes"] == 2
    assert len(got.skipped) == 3
    assert (out / "crops" / "3" / "5.jpg").exists()
    _assert_same(got, _reference(factory_dir, image_folder, 5), exact=False)


RANK_SCRIPT = '''
import datetime, json, os, shutil, sys
from pathlib import Path

import torch.distributed as dist

from convscope.atlas import build
from convscope.models import load_model

data, out, mode, report = sys.argv[1:5]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))
own = Path(out) / f"checkpoint-rank{rank}of2.pt"


def keep_last_checkpoint(done, total, elapsed):
    if rank == 1:  # a copy of rank 1's checkpoint after its last batch
        shutil.copy(own, Path(out) / "saved-rank1.pt")


atlas = build(load_model("tinyatlas:build", device="cpu"), data, ["0", "3"], topk=3,
              batch_size=5, out=out, crops=False, resume=mode == "resume",
              progress=keep_last_checkpoint if mode == "first" else None)
Path(report, f"rank{rank}.json").write_text(json.dumps(
    {"index": atlas.topk("3")[0].tolist(), "images": atlas.images}))
dist.destroy_process_group()
'''


def _two_ranks(script: Path, args: list[str], factory_dir: Path, env_extra: dict[str, str]
               ) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ranks 0 and 1 of a gloo group; fail (never hang) past 150 s."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(factory_dir), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(script), *args],
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a rank hung: the ranks did not take the same decision")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_ranks_decide_together_after_a_crash_between_checkpoint_removals(
        image_folder, factory_dir, tmp_path):
    """The atlas was written, rank 0 removed its checkpoint, rank 1 crashed before removing
    its own. On --resume rank 0 sees a finished atlas and rank 1 a checkpoint: both must
    take the same decision (return the finished atlas), not one returning while the other
    waits for it in a collective."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out, reports = tmp_path / "atlas", tmp_path / "reports"
    reports.mkdir()
    first = _two_ranks(script, [str(image_folder), str(out), "first", str(reports)],
                       factory_dir, {"CONVSCOPE_ATLAS_CHECKPOINT_BATCHES": "1"})
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert not list(out.glob("checkpoint*"))
    (out / "saved-rank1.pt").rename(out / "checkpoint-rank1of2.pt")  # the crash's leftover
    for report in reports.iterdir():
        report.unlink()
    second = _two_ranks(script, [str(image_folder), str(out), "resume", str(reports)],
                        factory_dir, {})
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    finished = Atlas.load(out)
    for rank in (0, 1):
        got = json.loads((reports / f"rank{rank}.json").read_text())
        assert got["images"] == finished.images
        assert got["index"] == finished.topk("3")[0].tolist()
    assert not list(out.glob("checkpoint*"))  # the stale checkpoint is gone too


# Cases a mutation run (stop 20) found unpinned.


def _export(stats: ChannelStats, classes: list[int], probs: list[float],
            failures: dict[int, str]) -> dict[str, Any]:
    return {"stats": {"conv": stats.state_dict()},
            "pred_class": torch.tensor(classes, dtype=torch.int32),
            "pred_prob": torch.tensor(probs, dtype=torch.float32), "failures": failures}


def test_gathered_exports_keep_every_ranks_predictions_and_top_images() -> None:
    """``_merge_exports`` of two ranks (images 0-2 and 3-5): class 0 is a real prediction
    (only -1 means none) and every rank's probabilities are kept; the merged top-k over
    non-square maps equals a numpy ranking of all six images."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 2, 3, generator=g)
    ranks = []
    for lo, hi in ((0, 3), (3, 6)):
        stats = ChannelStats(2, 2)
        stats.update(x[lo:hi], torch.arange(lo, hi))
        ranks.append(stats)
    exports = [
        _export(ranks[0], [2, 0, 1, -1, -1, -1], [0.5, 0.6, 0.7, 0, 0, 0], {}),
        _export(ranks[1], [-1, -1, -1, 0, 3, 0], [0, 0, 0, 0.8, 0.9, 0.4], {4: "bad"}),
    ]
    merged = _merge_exports(exports, torch.device("cpu"))
    assert merged["pred_class"].tolist() == [2, 0, 1, 0, 3, 0]
    np.testing.assert_allclose(merged["pred_prob"].numpy(), [0.5, 0.6, 0.7, 0.8, 0.9, 0.4])
    assert merged["failures"] == {4: "bad"}
    top = merged["stats"]["conv"]["top"]["max"]
    flat = x.flatten(2).numpy()
    peak, arg = flat.max(-1), flat.argmax(-1)
    for c in range(2):
        order = np.lexsort((np.arange(6), -peak[:, c]))[:2]
        assert top["index"][c].tolist() == order.tolist()
        assert top["location"][c].tolist() == [[int(arg[i, c]) // 3, int(arg[i, c]) % 3]
                                               for i in order]
