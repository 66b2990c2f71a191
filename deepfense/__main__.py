"""`python -m deepfense bench | check | list` (see deepfense/benchmark/cli.py).

Works where DeepFense (which owns `deepfense/__init__.py` and the `deepfense` command) is absent or installed into the
same site-packages; `deepfense-losses` and `python -m deepfense.losses` work in every layout.
"""

import sys

from deepfense.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
