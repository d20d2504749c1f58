"""Rewrite constraints.txt from the project's virtual environment (``pip freeze``).

Run after changing a dependency in pyproject.toml and re-running ``make test``, so the
exact versions CI tests are the ones ``make`` installs everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEADER = """\
# Exact versions for reproducible, offline installs: every pip call of the Makefile passes
# `-c constraints.txt`. pyproject.toml declares ranges; this file pins what CI tests.
# Regenerate with: .venv/bin/python scripts/freeze_constraints.py
"""


def main() -> int:
    """Write constraints.txt next to pyproject.toml; return the exit status."""
    root = Path(__file__).resolve().parent.parent
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    lines = sorted((line for line in frozen
                    if "==" in line and not line.lower().startswith("convscope==")),
                   key=str.lower)
    (root / "constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    sys.stdout.write(f"constraints.txt: {len(lines)} pins\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
