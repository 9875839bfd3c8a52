"""Pre-training entry point, both stages (see ``flexmol.train.cli``).

    deepspeed [--num_gpus N] launch/pretrain.py --config stage1 [key=value ...]
    python launch/pretrain.py --config configs/pretrain/stage1.yaml train.max_steps=10   # one process
"""
import sys

from flexmol.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
