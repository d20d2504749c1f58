"""``convscope visualize``: files written, progress on stderr, one-line errors."""

from __future__ import annotations

import json

from convscope.cli.main import main
from convscope.cli.visualize import channel_objectives


def test_channels_turn_into_objective_strings():
    assert channel_objectives(["a", "b.*"], 3) == ["a:0-2", "b.*:0-2"]
    assert channel_objectives(["a"], [1, 5]) == ["a:1,5"]
    assert channel_objectives(["a"], slice(8, None)) == ["a:8-"]
    assert channel_objectives(["a"], slice(2, 4)) == ["a:2-3"]
    assert channel_objectives(["a"], None) == ["a:*"]


def test_visualize_writes_grid_pngs_and_index(tmp_path, capsys):
    code = main(["visualize", "-l", "_blocks.1", "--channels", "0-1", "-O", "class:Egyptian cat",
                 "--steps", "3", "--size", "48", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr()
    assert "visualize: steps" in out.err and "3/3" in out.err  # the shared tqdm bar
    names = [json_row["objective"] for json_row in
             json.loads((tmp_path / "values.json").read_text())["images"]]
    assert names == ["_blocks.1:0", "_blocks.1:1", "class:Egyptian cat"]
    assert {p.name for p in tmp_path.iterdir()} >= {"grid.png", "index.html",
                                                     "002_class_Egyptian_cat.png"}
    assert out.out.splitlines()[0].startswith("_blocks.1:0\t")


def test_bad_layer_and_channel_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["visualize", "-l", "_blocks.22", "--channels", "3", "--steps", "1",
                 "--size", "32", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean '_blocks.2'" in err
    assert main(["visualize", "-l", "_blocks.0", "--channels", "16-20", "--steps", "1",
                 "--size", "32", "--out", str(tmp_path)]) == 2
    assert "channel 16 is out of range for layer '_blocks.0', which has 16" in capsys.readouterr().err
    assert main(["visualize", "--steps", "1", "--out", str(tmp_path)]) == 2
