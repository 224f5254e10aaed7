"""``python -m fromzero.cli`` runs the CLI, as ``python -m fromzero`` does."""

import sys

from fromzero.cli import main

if __name__ == "__main__":
    sys.exit(main())
