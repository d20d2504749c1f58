"""The documentation site: its pages exist, its code runs, its generated figures are real.

`make docs` (run by `make test`) builds the site with ``mkdocs build --strict``; these tests
catch drift earlier and independently: every Python block of the capability pages runs
against the bundled model, and scripts/gen_docs.py writes real numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_nav_page_exists_or_is_generated():
    pages = _nav_files(_config()["nav"])
    assert {"tutorial.md", "atlas.md", "benchmarks.md", "api.md", "cli.md",
            "generated/gallery.md"} <= set(pages)
    gen = (ROOT / "scripts" / "gen_docs.py").read_text()
    for page in pages:
        if page.startswith("generated/"):
            assert f'"{Path(page).name}"' in gen, f"{page}: nothing generates it"
        else:
            assert (DOCS / page).is_file(), page


def test_api_reference_names_resolve():
    for name in re.findall(r"^::: ([\w.]+)", (DOCS / "api.md").read_text(), re.M):
        parts = name.split(".")
        cut = len(parts)
        while cut > 1:  # the longest importable module prefix, as mkdocstrings resolves it
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                cut -= 1
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        assert obj.__doc__, f"{name} has no docstring to render"


def _python_blocks(page: str) -> list[str]:
    return [body for lang, body in FENCE.findall((DOCS / page).read_text())
            if lang == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("page", ["tutorial.md", "capture.md", "grids.md", "attribution.md",
                                  "explorer.md", "featvis.md"])
def test_page_code_runs(page, tmp_path, monkeypatch):
    """Each page's Python blocks, in order, in one namespace (as a reader would paste them)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    blocks = _python_blocks(page)
    assert blocks, page
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    written = [p for p in tmp_path.iterdir() if p.suffix in (".png", ".html")]
    if page in ("tutorial.md", "grids.md", "attribution.md", "explorer.md", "featvis.md"):
        assert written, f"{page}: its code should write a file"


@pytest.mark.slow
def test_gen_docs_writes_real_results(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setenv("COLUMNS", os.environ.get("COLUMNS", "96"))
    assert gen.main(["--out", str(tmp_path / "g"), "--skip-gallery"]) == 0
    out = tmp_path / "g"
    top5 = (out / "tutorial_top5.md").read_text().splitlines()
    # the bundled model's top 2 (Egyptian cat and tiger cat are 0.002 apart: BLAS orders them)
    assert {row.split("|")[2].strip() for row in top5[2:4]} == {"Egyptian cat", "tiger cat"}
    for name in ("input.png", "activations_first_conv.png", "filters_first_conv.png"):
        assert (out / "tutorial" / name).stat().st_size > 1000
        assert f"generated/tutorial/{name}" in (out / "tutorial_figures.md").read_text()
    sanity = (out / "sanity_gradcam.md").read_text()
    assert "sanity check for gradcam" in sanity and re.search(r"(PASS|FAIL): final", sanity)
    for page in DOCS.glob("*.md"):  # every included snippet exists after generation
        for target in re.findall(r'^--8<-- "([^"]+)"', page.read_text(), re.M):
            base = out.parent if target.startswith("generated/") else ROOT
            path = base / target.replace("generated/", "g/", 1) if base != ROOT else ROOT / target
            assert path.is_file(), f"{page.name} includes {target}, which is not generated"
    helps = (out / "cli_help.md").read_text()
    for command in ("activations", "cam", "atlas", "report", "serve", "models"):
        assert f"### `convscope {command}`" in helps
