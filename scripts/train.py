"""Same as ``transformax-train``:
``python scripts/train.py --config configs/gpt_small.yaml [key.sub=value ...]``."""

import sys

from transformax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
