"""Pre-training entry point, both stages.

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/pretrain/stage1.yaml [key=value ...]
    python launch/pretrain.py --config configs/pretrain/stage1.yaml train.max_steps=10   # one process

On CPU the same command runs with the gloo backend (set DS_ACCELERATOR=cpu for the launcher).
"""
import argparse
import sys

from flexmol.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a configs/pretrain/*.yaml file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    from flexmol.train.config import load
    from flexmol.train.trainer import Pretrainer

    try:
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"pretrain: {exc}", file=sys.stderr)
        return 2
    Pretrainer(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
