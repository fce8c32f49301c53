import sys

from moco_engine.tools.cli import train_main

sys.exit(train_main())
