"""The run's records: ``output_dir/metrics.jsonl`` (one JSON object per line, each with its
``split`` and ``step``), mirrored to wandb when it is on.

``metrics.jsonl`` holds each step once: before appending, a resumed run drops the records of the
steps after its checkpoint (it redoes them), and a run starting afresh sets an earlier run's file
aside.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    """Appends records to ``output_dir/metrics.jsonl``; with :meth:`start`, also to a wandb run
    (``wandb``: the config's wandb section; ``config``: the run's whole config, as a dict)."""

    def __init__(self, output_dir: Path, wandb=None, config: dict | None = None):
        self.out = Path(output_dir)
        self.path = self.out / "metrics.jsonl"
        self.wandb, self.config = wandb, config
        self._run = None

    def trim(self, step: int, resumed: bool, closing: bool) -> None:
        """Before appending: ``metrics.jsonl`` keeps the records of the steps up to this run's
        starting point ``step``, so that a step redone after a resume appears once. A ``resumed``
        run drops the records after its checkpoint's step (and, when it resumes to close
        (``closing``), the closing records of that step); a run starting afresh sets an earlier
        run's file aside (renamed, not deleted)."""
        path = self.path
        if not path.is_file():
            return
        if not resumed:
            if path.stat().st_size:
                aside = path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                os.replace(path, aside)
                print(f"[pretrain] {path} holds an earlier run's records (this one starts at step 0): moved to "
                      f"{aside.name}", flush=True)
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill while it was written
                dropped += bool(line.strip())
                continue
            if at > step or (closing and at == step and record.get("split") != "train"):
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            print(f"[pretrain] resuming at step {step}: {dropped} record(s) of later steps dropped from "
                  f"{path.name} (they are redone)", flush=True)

    def start(self) -> None:
        """The wandb run, offline unless the config says otherwise (with no network and an API key
        set, online mode hangs for minutes); nothing when wandb is disabled or not configured."""
        if self.wandb is None or self.wandb.mode == "disabled":
            return
        import wandb

        self._run = wandb.init(project=self.wandb.project, mode=self.wandb.mode, dir=str(self.out),
                               config=self.config, resume="allow")

    def log(self, record: dict) -> None:
        """One record appended (and its numbers sent to wandb at the record's step)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._run.log(flat, step=record["step"])

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
