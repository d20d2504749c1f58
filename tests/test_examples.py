"""The seed example script runs end to end (random weights offline) and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed_vgg16.py"


@pytest.mark.slow
def test_seed_example_runs_offline(tmp_path, monkeypatch):
    env_home = tmp_path / "torch-home"  # an empty hub cache: forces the offline branch
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={"TORCH_HOME": str(env_home), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    for name in ("features.0.png", "features.1.png", "features.10.png", "features.28.png",
                 "filters.features.0.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
