"""``python -m convscope`` (also what ``torchrun -m convscope`` runs)."""

from convscope.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
