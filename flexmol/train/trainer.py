"""The pre-training loop under DeepSpeed: any objective (FlexMol's two stages, M2UMol) on a mix of
streams, with checkpoints that resume exactly.

The loop knows the recipe only through its objective (:mod:`flexmol.objectives.base`, chosen by
the config key ``recipe``: :func:`flexmol.objectives.build_objective`) and is put together from
parts that each stand alone: the data mix and its streams (:mod:`flexmol.train.data`), the
checkpoints (:mod:`flexmol.train.checkpoint`), the metrics log (:mod:`flexmol.train.metrics`) and
validation on held-out data (:mod:`flexmol.train.validation`).

Stateful in one place: a checkpoint holds DeepSpeed's model, optimizer and scheduler states plus
the trainer's client state: the step, every rank's stream positions (a resumed stream seeks there,
in a time that does not grow with the step) and the records seen. Per-step randomness (atom
masking, coordinate noise) comes from a generator seeded by (seed, step, rank), so no RNG state
needs saving and a resumed run draws exactly what the uninterrupted one would have. Logged
training records count per source the molecules ``seen``, the ``unique`` ones and the ``passes``
over the source's data (its ``data.subset``, or all of it), every rank included, and the ``work``
done on them (:data:`WORK`: atoms, atom pairs, padded positions, batch pairs; what a FLOP model of
the network turns into the run's compute, ``flexmol.scaling.flops``).
``metrics.jsonl`` holds each step once: a resumed run first drops the records of the steps after
its checkpoint (it redoes them). A run stopped by a signal on a validation step checkpoints before
validating; the run that resumes from that checkpoint validates its step first.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from flexmol.config import ConfigError
from flexmol.data.collate import move
from flexmol.data.integrity import DataError, verify_checksums
from flexmol.model.summary import model_config
from flexmol.objectives import build_objective
from flexmol.train.checkpoint import (Checkpointer, _checkpoint_globals, find_export, initial_weights,
                                      load_initial_weights, weights_only_engine)
from flexmol.train.config import SOURCES, PretrainConfig, warmup_steps
from flexmol.train.data import WORK, TrainingData, batch_work, object_gather
from flexmol.train.metrics import MetricsLogger
from flexmol.train.schedule import lr_factor
from flexmol.train.validation import Validator, heldout_losses

__all__ = ["WORK", "DivergedError", "Pretrainer", "batch_work", "check_output_dir", "find_export", "heldout_losses",
           "initial_weights", "_checkpoint_globals"]


class DivergedError(RuntimeError):
    """The losses stopped being finite numbers; the message (one line) names the step and losses."""


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def check_output_dir(path: Path) -> None:
    """``output_dir`` is (or can be made) a writable directory; a :class:`ConfigError` naming the
    key and the path otherwise. Creates it."""
    def fail(why):
        raise ConfigError(f"config key 'output_dir': {path} {why}")

    if path.exists() and not path.is_dir():
        fail("is a file, not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"cannot be created: {parent} is a file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"is not writable ({exc.strerror or exc})")


def _single_process_env() -> None:
    """``python launch/pretrain.py`` without a launcher: a world of one (DeepSpeed otherwise looks
    for MPI)."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as sock:  # a free port, so that several single-process runs coexist
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class Pretrainer:
    def __init__(self, cfg: PretrainConfig):
        _single_process_env()
        import deepspeed

        self.cfg, t = cfg, cfg.train
        self.out = Path(cfg.output_dir)
        # what each rank can check alone comes first: a refused run starts no process group
        self.objective = build_objective(cfg)
        self.data = TrainingData(cfg)
        self.data.check_modalities(self.objective)
        self.valid_urls = self.data.heldout
        check_output_dir(self.out)
        self.checkpoints = Checkpointer(self.out, cfg.resume, cfg.model.size)
        self.metrics = MetricsLogger(self.out, cfg.wandb, _as_dict(cfg))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg.data.verify_checksums:
            started, shards = time.perf_counter(), self.data.shards
            verify_checksums(shards, self.rank, self.world, object_gather(self.world))
            self._say(f"sha256 of {len(shards)} shard(s), {sum(s['bytes'] for s in shards) / 1e6:.1f} MB: "
                      f"as in their manifests ({time.perf_counter() - started:.1f} s)")
        for note in self.data.notes:
            self._say(note)

        self.objective.prepare(self.data.samples(self.objective.sample_records))
        labels = self.objective.label_keys()
        torch.manual_seed(t.seed)
        model = self.objective.build_model(model_config(cfg.model.size))
        # A checkpoint in output_dir wins (the run resumes); otherwise init_from applies. An export
        # is loaded before DeepSpeed wraps the model, so that the optimizer's fp32 master copies
        # (ZeRO 1/2) and partitions (ZeRO 3) are made from it.
        target = self.checkpoints.resume_target()
        if cfg.init_from and target is None:
            say = (lambda m: print(f"[pretrain] {m}", file=sys.stderr, flush=True)) if self.rank == 0 else None
            self.init_source = load_initial_weights(Path(cfg.init_from), model, cfg.model.size, say)
        # The objective's fixed parameters (stage 2: the feature learners, the decoders' teachers):
        # outside the optimizer (AdamW's weight decay and momentum would move them even with zero
        # gradients) and without gradients, set once before DeepSpeed sees the model.
        self.frozen = self.objective.frozen(model)
        for p in self.frozen.values():
            p.requires_grad_(False)
        self.engine = self._engine(deepspeed, model)
        self.device = self.engine.device
        self.step = 0
        client = self.checkpoints.load(self.engine, *target) if target is not None else None
        self.resumed = target is not None
        if client:
            self.step = client["step"]
            if self.step > t.max_steps:
                raise ConfigError(f"config key 'train.max_steps': {t.max_steps} is before step {self.step}, where the "
                                  f"resumed checkpoint {target[0] / target[1]} stands")
        elif cfg.init_from:
            self._say(f"weights from {self.init_source}")
        log = lambda m: print(f"[pretrain] rank {self.rank}: {m}", file=sys.stderr, flush=True)
        self.stream = self.data.open(world=self.world, step=self.step, max_spd=self.engine.module.cfg.max_spd,
                                     max_path=self.engine.module.cfg.max_path, labels=labels, log=log)
        if client:
            self.data.load_state_dict(client, target[0] / target[1], self.rank, self.step)
            self._say(f"resumed from {target[0] / target[1]} at step {self.step}")
        self.validator = Validator(cfg, self.valid_urls, self.objective, labels)
        self._stop = False
        # the checkpoint's step is a validation step whose validation a stop signal cut out
        self._validation_due = bool(client and client.get("validation_due"))

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {message}", flush=True)

    def _engine(self, deepspeed, model: torch.nn.Module):
        """The DeepSpeed engine over ``model``: AdamW on its trainable parameters, the warm-up and
        decay schedule, gradient accumulation and clipping from the config."""
        t = self.cfg.train
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
        warmup = warmup_steps(t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup, t.max_steps, t.decay, t.min_lr_ratio))
        ds_config = json.loads(Path(self.cfg.deepspeed).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=t.grad_accum,
                         train_batch_size=t.grad_accum * self.world, gradient_clipping=t.grad_clip)
        # bf16 as autocast over fp32 weights (the model is tested under autocast; coordinates and
        # distances stay fp32), rather than DeepSpeed casting every parameter and input.
        ds_config.pop("bf16", None)
        ds_config.pop("fp16", None)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        engine.checkpoint_engine = weights_only_engine(engine.checkpoint_engine)
        return engine

    # -- checkpoints and export ----------------------------------------------------------------
    def data_seen(self) -> dict[str, dict]:
        """Per source: molecules seen, unique molecules seen, the molecules it can yield and passes
        over them, every rank counted (:meth:`flexmol.train.data.TrainingData.seen_report`)."""
        return self.data.seen_report()

    def export(self, directory: Path | None = None) -> Path:
        """The model as safetensors + its YAML config (rank 0 writes; every rank must call)."""
        import deepspeed

        from flexmol import save_pretrained

        directory = Path(directory or self.out / "export")
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3):
            if self.rank == 0:
                save_pretrained(self.engine.module, directory)
        return directory

    def save(self) -> None:
        """A checkpoint of this step: DeepSpeed's states, and as client state the step, the data's
        state (:meth:`flexmol.train.data.TrainingData.state_dict`: every rank's stream positions,
        the records seen, the counts) and whether this step's validation is still due."""
        client = {"step": self.step, **self.data.state_dict(), "validation_due": self._validation_due}
        self.checkpoints.save(self.engine, self.step, client)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train to ``train.max_steps``; with ``stop_after``, stop (and checkpoint) at that step as a
        preempted run would. Returns the training records of the steps run."""
        t = self.cfg.train
        stop_after = stop_after if stop_after is not None else t.stop_after
        last = min(t.max_steps, stop_after) if stop_after is not None else t.max_steps
        if self.step >= t.max_steps and find_export(self.out) is not None \
                and not self.objective.report_due(self.valid_urls, self.out):
            self._say(f"{self.out}: finished before (step {self.step}); nothing to do")  # left as it is
            return []
        if self.step >= last and self.step < t.max_steps:
            self._say(f"train.stop_after={stop_after}: the run stands at step {self.step} already; nothing to do")
            return []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics.trim(self.step, self.resumed, closing=self.step >= t.max_steps)
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.step, unit="step", desc=self.objective.title,
                       mininterval=1.0)
            self.metrics.start()
        history = []
        stopped = False  # agreed by every rank (the signal handler's flag is this rank's only)
        nonfinite = 0  # optimizer steps in a row with a loss that is not finite
        try:
            if self._validation_due:  # the validation of the checkpoint's step, stopped before it ran
                self.validate()
                self._validation_due = False
            while self.step < last:
                record, stop = self._train_step(last)
                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}", mol_s=f"{record['molecules_per_s']:.0f}")
                nonfinite = self._check_finite(record, nonfinite)
                v = self.cfg.validation
                due = bool(v.every) and self.step % v.every == 0 and self.step < t.max_steps
                if stop:  # a rank was asked to stop: all ranks checkpoint this step and exit
                    stopped = True
                    self._validation_due = due  # left to the run that resumes from the checkpoint
                    if self.rank == 0:
                        print(f"\n[pretrain] stop signal: checkpointing step {self.step} on every rank", flush=True)
                    break
                if due:
                    self.validate()
                if self.step % t.save_every == 0 and self.step < last and not nonfinite:
                    self.save()
            if history or stopped:
                self.save()
                self._say("data seen (all ranks): " + "; ".join(
                    f"{k} {v['seen']} molecules, {v['unique']} unique of {v['of']} ({v['passes']:.2f} passes)"
                    for k, v in self.data_seen().items()))
            if self.rank == 0 and any(self.data.skipped.values()):
                print(f"[pretrain] data.on_bad_record=skip: bad records skipped so far (all ranks): "
                      + ", ".join(f"data.{k} {n}" for k, n in self.data.skipped.items() if n), file=sys.stderr,
                      flush=True)
            if not stopped and self.step >= t.max_steps:  # (again, if a run was stopped while closing)
                export = self.export()
                self.validate()
                self.report(export)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.metrics.finish()
        return history

    def _train_step(self, last: int) -> tuple[dict, bool]:
        """One optimizer step of ``train.grad_accum`` micro-batches; its training record (logged
        every ``train.log_every`` steps, at ``last`` and when it stops the run) and whether a rank
        was asked to stop. Every value in the record is the same on every rank."""
        t, model = self.cfg.train, self.engine.module
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        computed: dict[str, int] = {}
        n = len(SOURCES)
        # molecules per source, skipped records per source, atoms, stop; then WORK per source
        counts = torch.zeros(2 * n + 2, dtype=torch.float64)
        work = torch.zeros(n, len(WORK), dtype=torch.float64)
        skipped_before = {k: s.skipped for k, s in self.stream.sources.items()}
        # every micro-batch of the step first: bad data met by any rank stops every rank here,
        # before the step's first collective (contrastive negatives, ZeRO reductions)
        drawn, failure = [], None
        for _ in range(t.grad_accum):
            try:
                drawn.append(next(self.stream)[1:])
            except DataError as exc:
                failure = str(exc)
                break
        wait = time.perf_counter() - started
        self._agree_on_data(failure)
        for micro, (source, batch) in enumerate(drawn):
            counts[SOURCES.index(source)] += batch["mask"].shape[0]
            counts[-2] += int(batch["num_atoms"].sum())  # still on the host: no device sync
            work[SOURCES.index(source)] += batch_work(batch["mask"])
            gen = torch.Generator(device=self.device).manual_seed(
                hash((t.seed, self.step, micro, self.rank)) & 0x7FFFFFFF)
            batch = move(batch, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                losses = self.objective.losses(model, batch, gen)
            self.engine.backward(losses["total"])
            self.engine.step()
            for k, v in losses.items():  # averaged over the micro-batches that have it
                sums[k] = sums.get(k, 0.0) + v.detach().float()
                computed[k] = computed.get(k, 0) + 1
        for k, s in self.stream.sources.items():
            counts[n + SOURCES.index(k)] = s.skipped - skipped_before[k]
        counts[-1] = float(self._stop)
        mean_losses, counts = self._reduce({k: v / computed[k] for k, v in sums.items()},
                                           torch.cat([counts, work.reshape(-1)]))
        counts, work = counts[:-work.numel()], counts[-work.numel():].reshape(work.shape)
        self.step += 1
        elapsed = time.perf_counter() - started
        molecules = {k: int(counts[i]) for i, k in enumerate(SOURCES) if counts[i] > 0}
        self.data.count(molecules, {k: int(counts[n + i]) for i, k in enumerate(SOURCES)},
                        {k: work[i].tolist() for i, k in enumerate(SOURCES)})
        grad_norm = self.engine.get_global_grad_norm()
        d = self.data
        record = {"split": "train", "step": self.step, "molecules": molecules,
                  **{f"loss/{k}": v for k, v in mean_losses.items()}, "atoms": int(counts[-2]),
                  "seen": dict(d.seen), "work": {k: dict(w) for k, w in d.work.items()},
                  "skipped_records": {k: n for k, n in d.skipped.items() if n},
                  "lr": self.engine.get_lr()[0], "seconds": elapsed, "loader_wait_share": wait / elapsed,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "molecules_per_s": sum(molecules.values()) / elapsed, "atoms_per_s": counts[-2].item() / elapsed}
        stop = bool(counts[-1] > 0)
        diverged = any(not math.isfinite(v) for v in mean_losses.values())
        if self.step % t.log_every == 0 or self.step == last or stop or diverged:
            # the same on every rank (reduced values): the ranks merge what they saw
            self.data.merge_coverage()
            seen = self.data_seen()
            record["unique"] = {k: v["unique"] for k, v in seen.items()}
            record["passes"] = {k: v["passes"] for k, v in seen.items()}
            if self.rank == 0:
                self._log(record)
        return record, stop

    def _check_finite(self, record: dict, nonfinite: int) -> int:
        """The optimizer steps in a row whose losses are not all finite, this one included; a
        :class:`DivergedError` at ``train.max_nonfinite_steps``. The same on every rank (reduced
        losses): all go on, or all stop without saving."""
        t = self.cfg.train
        diverged = sorted((k for k, v in record.items() if k.startswith("loss/") and not math.isfinite(v)),
                          key=lambda k: k != "loss/total")
        nonfinite = nonfinite + 1 if diverged else 0
        if diverged and self.rank == 0:
            print(f"\n[pretrain] step {self.step}: {diverged[0]} is not finite ({nonfinite} step(s) in a row; "
                  f"train.max_nonfinite_steps={t.max_nonfinite_steps})", file=sys.stderr, flush=True)
        if nonfinite >= t.max_nonfinite_steps:
            raise DivergedError(
                f"steps {self.step - nonfinite + 1}-{self.step}: {diverged[0]} not finite "
                f"{nonfinite} step(s) in a row (train.max_nonfinite_steps): the run diverged (train.lr "
                f"{t.lr:g}; a lower train.lr or a longer train.warmup_steps may help); nothing saved after "
                f"{self.checkpoints.saved_step()}")
        return nonfinite

    def _agree_on_data(self, failure: str | None) -> None:
        """Whether any rank's stream met data it cannot train on (``failure``: this rank's
        :class:`DataError` message, or None), agreed by one all-reduce of a flag: if one did, every
        rank raises the same one-line :class:`DataError`, the lowest such rank's."""
        where = ""
        if self.world > 1:
            flag = torch.tensor([float(failure is not None)], device=self.device)
            torch.distributed.all_reduce(flag)
            if not flag.item():
                return
            messages = object_gather(self.world)(failure)
            rank, failure = next((r, m) for r, m in enumerate(messages) if m is not None)
            where = f", read by rank {rank}"
        if failure is not None:
            raise DataError(f"{failure} (stopped in step {self.step + 1}{where})")

    def _reduce(self, sums: dict[str, torch.Tensor], counts: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """One all-reduce per step: every loss averaged over the ranks, molecule and atom counts
        summed, and the stop flag (any rank asked to stop). Loss names are the same on every rank
        (every rank draws the same sources)."""
        keys = sorted(sums)
        values = torch.cat([torch.stack([sums[k] for k in keys]).double().cpu(), counts]) if keys else counts
        if self.world > 1:
            values = values.to(self.device)
            torch.distributed.all_reduce(values)
            values = values.cpu()
        losses = {k: float(v) / self.world for k, v in zip(keys, values[:len(keys)].tolist())}
        return losses, values[len(keys):]

    def _log(self, record: dict) -> None:
        self.metrics.log(record)

    # -- validation and the closing report -----------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Every loss by name on each source's held-out molecules (fixed conformer, masks and
        noise), averaged over molecules and ranks; logged as a ``valid`` record."""
        if not self.valid_urls:
            return {}
        record = self.validator.evaluate(self.engine.module, self.step, device=self.device, rank=self.rank,
                                         world=self.world)
        if self.rank == 0:
            self._log(record)
            shown = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.endswith("/total"))
            print(f"\n[pretrain] step {self.step} validation: {shown}", flush=True)
        return record

    def report(self, export: Path) -> dict | None:
        """The objective's closing report on held-out data (FlexMol: the alignment report on
        held-out paired molecules, ``output_dir/alignment.json``), from the export, on rank 0;
        logged."""
        if self.rank != 0:
            return None
        d = self.cfg.data
        record = self.objective.report(export, self.valid_urls, self.out, max_atoms=d.max_atoms,
                                       on_bad_record=d.on_bad_record, device=self.device)
        if record is not None:
            record = {"split": record.pop("split"), "step": self.step, **record}
            self._log(record)
        return record

    def _on_signal(self, signum, frame) -> None:
        self._stop = True  # finish this step; the ranks agree on stopping, checkpoint and exit
