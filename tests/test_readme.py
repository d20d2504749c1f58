"""The README runs: its Python blocks (in order, one namespace) and every ``convscope`` line.

Read from README.md at collection time, so an edited README is tested as written. Offline
stand-ins, and only these: torchvision's ``weights="DEFAULT"`` loads a randomly initialised
state dict of the same architecture (the download is the only thing replaced), ``photo.jpg``
is scikit-image's coffee photo, ``photos/`` holds ten small sample crops, and
``convscope serve`` builds its app but does not start uvicorn. ``make`` lines are checked
with ``make -n`` (they install packages; CI runs them for real).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def _shell_lines() -> list[str]:
    """Commands of the bash blocks: continuations joined, comments dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"\s+", " ", line))
    return lines


def _without_optional(line: str) -> str:
    """``cmd a [--flag] [--x y]`` -> ``cmd a`` (the README's optional parts)."""
    return re.sub(r"\s*\[[^\]]*\]", "", line).strip()


CLI_LINES = [_without_optional(line) for line in _shell_lines() if line.startswith("convscope ")]
MAKE_LINES = [line for line in _shell_lines() if line.startswith("make ")]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A working folder with the README's inputs; DEFAULT weights load offline (random)."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    def random_state(self, *args, **kwargs):
        builder = type(self).__name__.removesuffix("_Weights").lower()
        return torchvision.models.get_model(builder).state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", random_state)
    from convscope.images import load_image

    load_image("sample:coffee").save(tmp_path / "photo.jpg")
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, name in enumerate(["chelsea", "coffee", "astronaut", "rocket", "chelsea",
                                  "coffee", "astronaut", "rocket", "chelsea", "coffee"]):
        picture = load_image(f"sample:{name}")
        side = min(picture.size) // 2
        left = (index * 17) % (picture.size[0] - side)
        picture.crop((left, 0, left + side, side)).resize((96, 96)).save(photos / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_code_to_test():
    assert len(_blocks("python")) >= 3
    assert len(CLI_LINES) >= 8
    assert {line.split()[1] for line in CLI_LINES} >= {
        "models", "layers", "activations", "filters", "demo", "cam", "atlas", "report", "serve"}


@pytest.mark.slow
def test_python_blocks_run_in_order(offline):
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(_blocks("python"), 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    for name in ("f28.png", "filters.png", "cam.png"):
        assert (offline / name).stat().st_size > 500, name
    assert namespace["act"].shape == (1, 64, 224, 224)  # the seed's LayerActivations
    assert (offline / "atlas" / "atlas.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("line", CLI_LINES, ids=[" ".join(c.split()[:2]) for c in CLI_LINES])
def test_cli_line_runs(line, offline, monkeypatch, capsys):
    from convscope.cli.main import main

    served = {}
    if line.split()[1] == "serve":
        import uvicorn

        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    argv = shlex.split(line)[1:]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{line}\n{captured.err}"
    if served:
        assert served["host"] == "127.0.0.1" and served["port"] == 8000
    else:
        assert captured.out.strip(), f"{line} printed nothing on stdout"


@pytest.mark.parametrize("line", MAKE_LINES)
def test_make_lines_are_real_targets(line):
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    result = subprocess.run(["make", "-n", *shlex.split(line)[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
