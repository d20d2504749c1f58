"""convscope.progress: the callback protocol, tracking, and the tqdm front end."""

from __future__ import annotations

import io
import re

from convscope.progress import TqdmProgress, atlas_adapter, message_adapter, report, track


def test_track_reports_each_item_and_passes_items_through():
    seen = []
    items = list(track(iter("abc"), lambda *a: seen.append(a), "letters", total=3))
    assert items == ["a", "b", "c"]
    assert seen == [("letters", 0, 3), ("letters", 1, 3), ("letters", 2, 3), ("letters", 3, 3)]
    assert list(track([1, 2], None, "x")) == [1, 2]  # no callback: nothing to call
    seen.clear()
    list(track([5, 6], lambda *a: seen.append(a), "sized"))
    assert seen[-1] == ("sized", 2, 2)  # total from len()


def test_adapters_map_the_older_callback_shapes():
    seen = []
    atlas_adapter(lambda *a: seen.append(a))(40, 100, 1.5)
    step = message_adapter(lambda *a: seen.append(a), "report", total=2)
    step("layer table")
    step("CAM")
    assert seen == [("images", 40, 100), ("report: layer table", 1, 2), ("report: CAM", 2, 2)]
    assert atlas_adapter(None) is None and message_adapter(None, "r") is None
    report(None, "x", 1)  # a no-op, not an error


def test_tqdm_progress_draws_one_bar_per_phase_and_quiet_draws_nothing():
    out = io.StringIO()
    with TqdmProgress(file=out) as bar:
        for done in range(5):
            bar("scoring", done, 4 if done < 5 else None)
        bar("writing crops", 0, 2)
        bar("writing crops", 2, 2)
    text = out.getvalue()
    final = re.findall(r"(scoring|writing crops): 100%\|[^|]*\| (\d+)/(\d+)", text)
    assert ("scoring", "4", "4") in final
    assert ("writing crops", "2", "2") in final
    quiet = io.StringIO()
    TqdmProgress(enabled=False, file=quiet)("scoring", 1, 4)
    assert quiet.getvalue() == ""


def test_tqdm_progress_groups_detail_phases_into_one_bar():
    out = io.StringIO()
    with TqdmProgress(file=out) as bar:
        bar("report: loading", 1, 3)
        bar("report: layers", 2, 3)
        bar("report: CAM", 3, 3)
    text = out.getvalue()
    assert text.count("0/3") == 1  # one bar opened
    assert text.count("\n") == 1  # and closed once
    assert "report: CAM: 100%" in text
