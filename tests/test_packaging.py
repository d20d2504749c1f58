"""Packaging: dependency ranges, pins, extras, and a wheel that installs next to a user's torch."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "convscope"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """Normalised distribution name of a PEP 508 requirement."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = pinned
    return pins


def test_torch_is_a_range_and_the_pins_are_what_runs_here():
    project = _pyproject()["project"]
    deps = {_name(d): d for d in project["dependencies"]}
    for name in ("torch", "torchvision"):
        assert "==" not in deps[name], f"{name} must be a range, not a pin: {deps[name]}"
        assert ">=" in deps[name]
    pins = _pins()
    import torch
    import torchvision

    assert pins["torch"] == torch.__version__.split("+")[0]
    assert pins["torchvision"] == torchvision.__version__.split("+")[0]
    # every declared dependency, core or extra, is pinned
    declared = set(deps)
    for extra in project["optional-dependencies"].values():
        declared |= {_name(d) for d in extra if not d.startswith("convscope")}
    assert declared - set(pins) == set()


def test_pillow_floor_has_load_default_size():
    deps = {_name(d): d for d in _pyproject()["project"]["dependencies"]}
    floor = re.search(r">=([0-9.]+)", deps["pillow"]).group(1)
    assert tuple(int(p) for p in floor.split(".")) >= (10, 1)  # ImageFont.load_default(size=)


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of src/convscope that import it (stdlib and self left out)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("convscope", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    project = _pyproject()["project"]
    declared = {_name(d) for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(d) for d in extra}
    owners = packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        dists = {_name(d) for d in owners.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(files)
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"


def test_no_declared_core_dependency_is_unused():
    deps = {_name(d) for d in _pyproject()["project"]["dependencies"]}
    owners = packages_distributions()
    used = {_name(dist) for module in _third_party_imports()
            for dist in owners.get(module, [module])}
    assert deps - used == set()


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    from convscope._extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(MissingExtraError) as info:
        require("uvicorn", "convscope serve")
    assert str(info.value) == ("convscope serve needs uvicorn, which is not installed: "
                               "pip install 'convscope[serve]'")
    assert isinstance(info.value, ImportError)
    assert require("json").dumps([1]) == "[1]"
    with pytest.raises(ImportError):  # an unknown module is not blamed on an extra
        require("no_such_module_xyz")


def test_serve_without_uvicorn_prints_one_line(monkeypatch, capsys):
    from convscope.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "pip install 'convscope[serve]'" in err
    assert "Traceback" not in err


def test_license_changelog_and_urls():
    project = _pyproject()["project"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert project["license"] == "MIT"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{project['version']}]" in changelog
    assert {"Homepage", "Documentation", "Repository", "Changelog"} <= set(project["urls"])


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel from a copy of the tracked sources (no egg-info or caches of this checkout)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src" / "convscope",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("convscope-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_next_to_an_existing_torch_and_runs(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {str(p.relative_to(SRC.parent)) for p in SRC.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert {"convscope/py.typed", "convscope/server/static/index.html",
            "convscope/report/templates/report.html"} <= data
    assert data - names == set(), "package data missing from the wheel"
    assert any(n.endswith("licenses/LICENSE") for n in names)

    # A user's environment: a fresh venv that already has torch (borrowed from this one
    # through a .pth file), then a plain `pip install` of the wheel with its dependencies.
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    import sysconfig

    (Path(site) / "_host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert not list(Path(site).glob("torch*")), "pip installed a second torch"

    check = (
        "import torch, torchvision, convscope\n"
        "from importlib.resources import files\n"
        "root = files('convscope')\n"
        "for p in ('py.typed', 'server/static/index.html', 'server/static/app.js',"
        " 'report/templates/report.html'):\n"
        "    assert root.joinpath(p).is_file(), p\n"
        "print(torch.__version__, torch.__file__, convscope.__file__, convscope.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    torch_version, torch_file, convscope_file, convscope_version = run.stdout.split()
    import torch

    assert torch_version == torch.__version__
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()  # untouched
    assert convscope_file.startswith(site)  # the wheel, not this checkout
    assert convscope_version == version("convscope")

    cli = subprocess.run([str(venv / "bin" / "convscope"), "layers", "--filter", "_conv_stem",
                          "--json"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    (row,) = json.loads(cli.stdout)
    assert (row["name"], row["output_shape"], row["params"]) == ("_conv_stem", [32, 112, 112],
                                                                 3 * 3 * 3 * 32)
