"""``convscope serve`` and ``convscope report`` from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convscope.cli.main import main


def test_report_command_writes_one_file(tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    code = main(["report", "sample:chelsea", "--layers", "_blocks.3", "--layers", "_conv_head",
                 "--cam-topk", "1", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert str(out) in captured.out
    assert "MiB" in captured.out
    text = out.read_text()
    assert "Egyptian cat" in text
    assert "_conv_head — 1280×7×7" in text
    assert "_blocks.3 — 40×28×28" in text
    assert "Class activation maps (gradcam, top-1 classes)" in text


@pytest.mark.parametrize(("argv", "needle"), [
    (["report", "sample:chelsea", "--model", "resnet19"], "did you mean"),
    (["report", "sample:chelsy"], "'chelsea'"),
    (["report", "no/such/file.png"], "no such image file"),
])
def test_report_errors_are_one_line(tmp_path, capsys, argv, needle):
    code = main([*argv, "--out", str(tmp_path / "x.html")])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


def test_serve_binds_loopback_by_default(monkeypatch, tmp_path, capsys):
    import uvicorn
    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.png")
    seen = {}

    def fake_run(app, host, port, **kwargs):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", "resnet18", "--image", str(tmp_path), "--port", "8765",
                 "--max-upload-mb", "1"]) == 0
    assert seen["host"] == "127.0.0.1"
    assert seen["port"] == 8765
    state = seen["app"].state.convscope
    assert list(state.models.entries) == ["resnet18"]
    assert state.models["resnet18"].loaded is not None  # loaded once, before serving
    assert state.settings.max_upload_bytes == 1024 * 1024
    assert "file:a.png" in {row["id"] for row in state.images.listing()}
    assert "127.0.0.1:8765" in capsys.readouterr().err
    assert main(["serve", "--model", "resnet18", "--host", "0.0.0.0"]) == 0
    assert seen["host"] == "0.0.0.0"
    assert "other machines" in capsys.readouterr().err


def test_frontends_module_imports_no_heavy_packages():
    code = ("import sys, convscope.cli.frontends; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_serve_a_checkpoint(monkeypatch, tmp_path):
    import torch
    import torchvision
    import uvicorn

    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=4)
    torch.save(net.state_dict(), tmp_path / "mine.pt")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app))
    assert main(["serve", "--model", str(tmp_path / "mine.pt"), "--arch", "resnet18"]) == 0
    entry = seen["app"].state.convscope.models["mine"]
    assert entry.get().module.fc.out_features == 4
    torch.testing.assert_close(entry.get().module.fc.weight, net.fc.weight)
    assert main(["serve", "--model", "a", "--model", "b", "--arch", "resnet18"]) == 2


def test_report_rejects_unknown_cam_method(tmp_path, capsys):
    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as info:
        main(["report", "sample:chelsea", "--cam-method", "gradcma", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gradcma'" in err and "gradcam++" in err
    assert not out.exists()


def test_report_quiet_prints_no_progress(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "sample:chelsea", "-l", "_conv_stem", "--cam-topk", "1",
                 "--cam-method", "eigencam", "--quiet", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(str(out))
    assert "Class activation maps (eigencam, top-1 classes)" in out.read_text()


def test_report_progress_is_one_bar_on_stderr(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "sample:chelsea", "-l", "_conv_stem", "--cam-topk", "1",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "report: " in err and "3/3" in err
    assert err.count("0/3") == 1  # one bar for all steps and the report's own phases


def test_serve_help_describes_only_real_forms(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "NAME=PATH" not in text
    assert "--arch" in text


def test_report_visualize_flags_add_the_grid_with_progress(tmp_path, capsys):
    out = tmp_path / "r.html"
    argv = ["report", "sample:chelsea", "-l", "_conv_stem", "--cam-topk", "1", "--visualize",
            "--vis-channels", "2", "--vis-steps", "3", "--vis-size", "32", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "visualize: steps" in err and "3/3" in err
    text = out.read_text()
    assert "Feature visualisations of 1 layer(s)" in text
    assert "_conv_stem — channels 0–1" in text and "3 steps at 32 px" in text
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv[:6], "--quiet", "--out", str(out)]) == 0  # default: no visualisations
    assert "Feature visualisations" not in out.read_text()
