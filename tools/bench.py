"""Thin wrapper of ``moco-bench`` (moco_engine/tools/bench.py) for a checkout without the package installed:

    python tools/bench.py r18-cifar --data --pipeline device
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.tools.bench import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())
