"""``moco-train`` for torchrun, from a checkout:

    torchrun --nproc_per_node=8 tools/train.py configs/experiment/cifar10_demo.yaml queue.size=8192

(``torchrun --nproc_per_node=8 -m moco_engine ...`` does the same with the package installed.)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.tools.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
