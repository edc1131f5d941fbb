"""``python -m torchgraph``: the same command line as the ``torchgraph`` script (see cli.py)."""

import sys

from .cli import main

__all__: list = []

if __name__ == "__main__":
    sys.exit(main())
