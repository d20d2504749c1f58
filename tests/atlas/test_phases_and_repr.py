"""Every atlas phase reports progress (library callback and CLI, --quiet silences it); the
notebook summary (Atlas._repr_html_) shows the real numbers and the saved crops."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from convscope.atlas import Atlas, build


def test_every_phase_reports_in_order(tiny_loaded, image_folder, tmp_path):
    seen: list[tuple[str, int, int | None]] = []
    atlas = build(tiny_loaded, image_folder, ["0", "3"], topk=3, batch_size=5,
                  out=tmp_path / "atlas", crop_size=8, fused="eager",
                  phases=lambda *step: seen.append(step))
    names = list(dict.fromkeys(name for name, _, _ in seen))
    assert names == ["atlas images", "atlas crops", "atlas html"]  # eager: no compile
    listed = atlas.meta["dataset"]["listed"]
    images = [(done, total) for name, done, total in seen if name == "atlas images"]
    assert images[0] == (0, listed) and images[-1] == (listed, listed)
    assert [d for d, _ in images] == sorted(d for d, _ in images)
    # crops: one unit per distinct top-k image read plus one per channel strip written,
    # worked out from the result itself.
    wanted = {int(i) for layer in atlas.layers for i in atlas.topk(layer)[0].ravel()}
    strips = sum(atlas.topk(layer)[0].shape[0] for layer in atlas.layers)
    crops = [(done, total) for name, done, total in seen if name == "atlas crops"]
    assert crops[0] == (0, len(wanted) + strips)
    assert [d for d, _ in crops] == list(range(len(wanted) + strips + 1))
    assert [(d, t) for name, d, t in seen if name == "atlas html"] == [(0, 1), (1, 1)]
    assert len(list((tmp_path / "atlas" / "crops").rglob("*.jpg"))) == strips


def test_compile_warm_up_reports(monkeypatch):
    """The compile warm-up (seconds of silence before) is a phase of its own; the eager
    choice reports nothing."""
    import importlib

    build_module = importlib.import_module("convscope.atlas.build")
    calls: list[str] = []
    monkeypatch.setattr(build_module, "_probe_compile", lambda device: calls.append("probe"))
    seen: list[tuple] = []

    def record(*step):
        seen.append((*step, list(calls)))

    cpu = torch.device("cpu")
    assert build_module._choose_reduction("compile", 1, cpu, None, 1, record) is True
    # 0/1 before the probe compiled anything, 1/1 after it.
    assert seen == [("atlas compile", 0, 1, []), ("atlas compile", 1, 1, ["probe"])]
    seen.clear()
    assert build_module._choose_reduction("auto", 10**6, cpu, None, 1, record) is False
    assert seen == []


def test_cli_prints_the_phases_unless_quiet(image_folder, tiny_factory, tmp_path, capsys):
    from convscope.cli.main import main

    def run(out: Path, *extra: str) -> str:
        assert main(["atlas", str(image_folder), "--model", tiny_factory, "--device", "cpu",
                     "-l", "0", "--topk", "2", "--batch-size", "6", "--crop-size", "8",
                     "--workers", "0", "--out", str(out), *extra]) == 0
        return capsys.readouterr().err

    loud = run(tmp_path / "loud")
    assert re.search(r"atlas crops: 0/\d+", loud) and re.search(r"atlas html: 1/1", loud)
    assert "images/s" in loud
    quiet = run(tmp_path / "quiet", "--quiet")
    assert "atlas crops" not in quiet and "atlas html" not in quiet
    assert "images/s" not in quiet


def test_repr_html_summarises_layers_and_embeds_top_crops(tiny_loaded, image_folder, tmp_path):
    out = tmp_path / "atlas"
    built = build(tiny_loaded, image_folder, ["0", "3"], topk=3, batch_size=5, out=out,
                  crop_size=8, fused="eager")
    for atlas in (built, Atlas.load(out)):
        page = atlas._repr_html_()
        assert f"{len(atlas.images)} images ({len(atlas.skipped)} skipped)" in page
        rows = re.findall(r"<tr><td><code>([^<]+)</code></td>(.*?)</tr>", page)
        assert [name for name, _ in rows] == ["0", "3"]
        for name, cells in rows:
            stats = atlas.stats(name)
            values = re.findall(r"<td>([^<]*)</td>", cells)
            assert values[2] == f"{int(stats['dead'].sum())} / {len(stats['dead'])}"
            assert values[3] == str(int(stats["saturated"].sum()))
            assert float(values[4]) == pytest.approx(stats["frac_positive"].mean(), abs=5e-4)
        # The strips of the last layer's channels with the highest max, as saved on disk.
        maxima = atlas.stats("3")["max"]
        best = np.argsort(-maxima, kind="stable")[:Atlas.REPR_STRIPS]
        shown = re.findall(r"channel (\d+)<br><img src=\"data:image/jpeg;base64,([^\"]+)\"",
                           page)
        assert [int(c) for c, _ in shown] == [int(c) for c in best]
        for channel, data in shown:
            assert base64.b64decode(data) == (out / "crops" / "3" / f"{channel}.jpg").read_bytes()
    # In memory, never saved: the summary without pictures.
    memory = build(tiny_loaded, image_folder, ["3"], topk=3, batch_size=5, fused="eager")
    assert "<img" not in memory._repr_html_() and "<code>3</code>" in memory._repr_html_()
