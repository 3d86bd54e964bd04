"""``python -m saekit``: the same command line as ``saekit`` (and what ``torchrun -m saekit`` runs)."""

import sys

from saekit.cli import main

if __name__ == "__main__":
    sys.exit(main())
