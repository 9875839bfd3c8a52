"""Pre-training entry point, both stages: what ``launch/pretrain.py`` and ``flexmol pretrain`` run.

    deepspeed [--num_gpus N] launch/pretrain.py --config stage1 [key=value ...]
    python launch/pretrain.py --config configs/pretrain/stage1.yaml train.max_steps=10   # one process

``--config`` is a packaged stage config (``stage1``, ``stage2``) or a YAML file; any config key
follows as ``key=value`` (e.g. ``data.paired=[shards/qm9] train.max_steps=100``). On CPU the same
command runs with the gloo backend (set DS_ACCELERATOR=cpu for the launcher).

Exit status: 0 when the run ends (finished, or stopped by a signal or train.stop_after and
checkpointed); 2 when the configuration or the data is refused, at start-up or by a bad record met
while training (one line naming the key, dataset, shard or record); 1 when the losses stop being
finite (train.max_nonfinite_steps).
"""
from __future__ import annotations

import argparse
import sys

from flexmol.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage1, stage2 or a pre-training YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    from flexmol.data.integrity import DataError
    from flexmol.train.config import load
    from flexmol.train.trainer import DivergedError, Pretrainer

    try:
        cfg = load(args.config, overrides)
        trainer = Pretrainer(cfg)
        trainer.run()
    except ConfigError as exc:
        print(f"flexmol pretrain: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # bad data met while training: one line naming the dataset, shard and record
        print(f"flexmol pretrain: {exc}", file=sys.stderr)
        return 2
    except DivergedError as exc:
        print(f"flexmol pretrain: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
