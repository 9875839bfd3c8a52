"""Fine-tuning entry point (the MoleculeNet protocol, every model x seed).

    python launch/finetune.py --checkpoint outputs/stage2 --data moleculenet:bbbp --target p_np \
        --task classification --split scaffold --seeds 3 --out outputs/ft/bbbp
    deepspeed --num_gpus 8 launch/finetune.py ...   # runs spread over the GPUs, one per rank at a time

Same arguments as ``flexmol finetune``; ``key=value`` overrides any config key.
"""
import sys

from flexmol.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
