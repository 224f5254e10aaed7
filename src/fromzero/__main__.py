"""``python -m fromzero`` runs the CLI (handy under torchrun: ``torchrun -m fromzero ...``)."""

import sys

from fromzero.cli import main

if __name__ == "__main__":
    sys.exit(main())
