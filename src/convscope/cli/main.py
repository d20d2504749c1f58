"""Entry point of the ``convscope`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# Modules that define subcommands; each exposes ``register(subparsers)`` and sets
# ``func`` on its parsers. The function receives the parsed namespace and returns an
# exit code.
COMMAND_MODULES = [
    "convscope.cli.core",
    "convscope.cli.cam",
    "convscope.cli.atlas",
    "convscope.cli.frontends",
    "convscope.cli.visualize",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    from convscope import __version__

    parser = argparse.ArgumentParser(
        prog="convscope",
        description="See what a convolutional neural network has learned.",
    )
    parser.add_argument("--version", action="version", version=f"convscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _importable_cwd() -> None:
    """Let ``--model package.module:factory`` import from the current folder, as it does
    under ``python -m convscope``. The folder goes last on ``sys.path``, so nothing in it
    can shadow the standard library or an installed package."""
    cwd = os.getcwd()
    if not any(entry in ("", cwd) for entry in sys.path):
        sys.path.append(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; expected errors print one line and return 2 (usage) or 1 (runtime)."""
    _importable_cwd()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from convscope.errors import ConvscopeError

    try:
        return int(args.func(args) or 0)
    except ConvscopeError as error:
        print(f"convscope {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except FileNotFoundError as error:
        print(f"convscope {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
