"""`python -m deepfense.losses bench | check | list | deepfense ...`: the same CLI as `deepfense-losses`
(deepfense/benchmark/cli.py), under a module path that only this distribution owns."""

import sys

from deepfense.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
