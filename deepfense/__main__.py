"""`python -m deepfense bench | check | list` (see deepfense/benchmark/cli.py)."""

import sys

from .benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
