"""``python -m deconvis``: the command-line interface."""
from deconvis.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
