"""The pre-training loop under DeepSpeed: both stages, mixed streams, checkpoints that resume exactly.

Stateful in one place: a checkpoint holds DeepSpeed's model, optimizer and scheduler states plus
the trainer's client state (step and every stream's position). Per-step randomness (atom masking,
coordinate noise) comes from a generator seeded by (seed, step, rank), so no RNG state needs saving
and a resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import time
from pathlib import Path

import torch

from flexmol.config import ConfigError
from flexmol.data.collate import move
from flexmol.data.shards import load_manifest
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, dataset_urls, fixed_batches, heldout_records
from flexmol.model import FlexMol
from flexmol.model.summary import model_config
from flexmol.objectives import pretraining_losses
from flexmol.train.config import PretrainConfig
from flexmol.train.schedule import lr_factor

SOURCE_NAMES = ("paired", "single_2d", "single_3d")
MODALITY = {"paired": "paired", "single_2d": "2d", "single_3d": "3d"}


def _weights_only_engine(engine):
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False`` (full unpickling): a
    checkpoint from elsewhere could run code. Ours loads with ``weights_only=True``; the few plain
    DeepSpeed and Python types its files hold are allow-listed by name, nothing else."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine) is not TorchCheckpointEngine:
        return engine  # other engines (nebula, decoupled) keep their own loading

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.__class__ = WeightsOnlyCheckpointEngine
    return engine


def _checkpoint_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _checked_urls(dirs, key: str, modality: str) -> list[str]:
    """The shards of the datasets ``dirs`` given as config key ``key``, refusing at start-up what
    would fail later."""
    urls = []
    for d in dirs:
        if not (Path(d) / "manifest.json").exists():
            raise ConfigError(f"config key '{key}': {d} is not a finished dataset (no manifest.json)")
        held = load_manifest(Path(d)).get("modality")
        if held != modality:
            raise ConfigError(f"config key '{key}': {d} holds {held} data; this slot takes {modality} datasets")
        got = dataset_urls([d])
        if not got:
            raise ConfigError(f"config key '{key}': {d} holds no molecules")
        urls += got
    return urls


def split_sources(cfg: PretrainConfig) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Training and held-out shards per source, and notes on what was decided. A source with
    held-out directories in ``validation.<source>`` trains on all its shards; otherwise each of its
    datasets holds out its last ``validation.holdout_shards`` shards when it has more than that."""
    train, valid, notes = {}, {}, []
    v = cfg.validation
    for key in SOURCE_NAMES:
        data_dirs, valid_dirs = getattr(cfg.data, key), getattr(v, key)
        if not data_dirs:
            continue
        both = {str(Path(d).resolve()) for d in valid_dirs} & {str(Path(d).resolve()) for d in data_dirs}
        if both:
            raise ConfigError(f"config key 'validation.{key}': {sorted(both)} also in data.{key}; held-out data "
                              "must not be trained on")
        if valid_dirs:
            valid[key] = _checked_urls(valid_dirs, f"validation.{key}", MODALITY[key])
        train[key] = []
        for d in data_dirs:
            got = _checked_urls([d], f"data.{key}", MODALITY[key])
            if not valid_dirs and v.holdout_shards and len(got) > v.holdout_shards:
                got, out = got[:-v.holdout_shards], got[-v.holdout_shards:]
                valid.setdefault(key, []).extend(out)
                notes.append(f"{key}: {d}: {len(out)} of {len(got) + len(out)} shards held out for validation")
            elif not valid_dirs:
                notes.append(f"{key}: {d}: no validation ({len(got)} shard(s), validation.holdout_shards="
                             f"{v.holdout_shards}; set validation.{key}=[DIR] for a held-out dataset)")
            train[key] += got
    return train, valid, notes


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

        self.cfg = cfg
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        sources, self.valid_urls, notes = split_sources(cfg)
        if self.rank == 0:
            for note in notes:
                print(f"[pretrain] {note}", flush=True)
        self.schedule = MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in cfg.data.mix], list(sources))

        torch.manual_seed(cfg.train.seed)
        model = FlexMol(model_config(cfg.model.size))
        # A checkpoint in output_dir wins (the run resumes); otherwise init_from applies. An export
        # is loaded before DeepSpeed wraps the model, so that the optimizer's fp32 master copies
        # (ZeRO 1/2) and partitions (ZeRO 3) are made from it.
        target = self._resume_target()
        if cfg.init_from and target is None:
            state, self.init_source = initial_weights(Path(cfg.init_from), model)
            model.load_state_dict(state, strict=True)
        # Stage 2: the feature learners are frozen teachers. Outside the optimizer (AdamW's weight
        # decay and momentum would move them even with zero gradients) and without gradients, set
        # once before DeepSpeed sees the model.
        self.frozen = frozen_parameters(model, cfg.stage)
        for p in self.frozen.values():
            p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        t = cfg.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.decay, t.min_lr_ratio))
        ds_config = json.loads(Path(cfg.deepspeed).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=t.grad_accum,
                         train_batch_size=t.grad_accum * self.world, gradient_clipping=t.grad_clip)
        # bf16 as autocast over fp32 weights (the model is tested under autocast; coordinates and
        # distances stay fp32), rather than DeepSpeed casting every parameter and input.
        ds_config.pop("bf16", None)
        ds_config.pop("fp16", None)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=ds_config)
        self.engine.checkpoint_engine = _weights_only_engine(self.engine.checkpoint_engine)
        self.device = self.engine.device
        self.step = 0
        taken = {k: 0 for k in sources}
        client = None
        if target is not None:
            _, client = self.engine.load_checkpoint(str(target[0]), tag=target[1])
        elif cfg.init_from and self.rank == 0:
            print(f"[pretrain] weights from {self.init_source}", flush=True)
        self._wandb_run = None
        self.seen = {k: 0 for k in sources}  # molecules seen per source, all ranks
        if client:
            self.step = client["step"]
            taken.update(client["stream"]["taken"])
            self.seen.update(client.get("seen", {}))
        d = cfg.data
        self.stream = MixedStream(
            {k: SourceStream(k, urls, max_atoms=d.max_atoms, seed=t.seed, shuffle_buffer=d.shuffle_buffer,
                             num_workers=d.num_workers, taken=taken[k], max_spd=self.engine.module.cfg.max_spd,
                             max_path=self.engine.module.cfg.max_path)
             for k, urls in sources.items()},
            self.schedule, t.seed, step=self.step * t.grad_accum, grad_accum=t.grad_accum)
        self._valid_batches: dict[str, list[dict]] | None = None
        self._stop = False

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume_target(self) -> tuple[Path, str | None] | None:
        """The checkpoint this run continues from: (directory, tag or None for its latest)."""
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            return (self.ckpt_dir, None) if (self.ckpt_dir / "latest").exists() else None
        return Path(self.cfg.resume).parent, Path(self.cfg.resume).name

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
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step-{self.step:08d}",
                                    client_state={"step": self.step, "stream": self.stream.state_dict(),
                                                  "seen": dict(self.seen)})

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train to ``train.max_steps``; with ``stop_after``, stop (and checkpoint) at that step as a
        preempted run would. Returns the training records of the steps run."""
        t, model = self.cfg.train, self.engine.module
        stop_after = stop_after if stop_after is not None else t.stop_after
        last = min(t.max_steps, stop_after) if stop_after is not None else t.max_steps
        closed = (self.out / "alignment.json").is_file() or not self.valid_urls.get("paired") \
            or not self.cfg.validation.alignment_count
        if self.step >= t.max_steps and find_export(self.out) is not None and closed:
            # a finished run: its checkpoint, export and reports stay as they are
            if self.rank == 0:
                print(f"[pretrain] {self.out}: finished before (step {self.step}); nothing to do", flush=True)
            return []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        self._wandb_run = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.step, unit="step", desc=f"stage {self.cfg.stage}", mininterval=1.0)
            self._wandb_run = self._wandb()
        train_feature_learners = self.cfg.stage == 1
        history = []
        stopped = False  # agreed by every rank (the signal handler's flag is this rank's only)
        try:
            while self.step < last:
                started = time.perf_counter()
                wait = 0.0
                sums: dict[str, torch.Tensor] = {}
                computed: dict[str, int] = {}
                counts = torch.zeros(len(SOURCE_NAMES) + 2, dtype=torch.float64)  # molecules per source, atoms, stop
                for micro in range(t.grad_accum):
                    w0 = time.perf_counter()
                    _, source, batch = next(self.stream)
                    wait += time.perf_counter() - w0
                    counts[SOURCE_NAMES.index(source)] += batch["mask"].shape[0]
                    counts[-2] += int(batch["num_atoms"].sum())  # still on the host: no device sync
                    gen = torch.Generator(device=self.device).manual_seed(
                        hash((t.seed, self.step, micro, self.rank)) & 0x7FFFFFFF)
                    batch = move(batch, self.device)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                        losses = pretraining_losses(model, batch, self.cfg.objective, gen,
                                                    train_feature_learners=train_feature_learners)
                    self.engine.backward(losses["total"])
                    self.engine.step()
                    for k, v in losses.items():  # averaged over the micro-batches that have it
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                        computed[k] = computed.get(k, 0) + 1
                counts[-1] = float(self._stop)
                mean_losses, counts = self._reduce({k: v / computed[k] for k, v in sums.items()}, counts)
                self.step += 1
                elapsed = time.perf_counter() - started
                molecules = {k: int(counts[i]) for i, k in enumerate(SOURCE_NAMES) if counts[i] > 0}
                for k, n in molecules.items():
                    self.seen[k] += n
                grad_norm = self.engine.get_global_grad_norm()
                record = {"split": "train", "step": self.step, "molecules": molecules,
                          **{f"loss/{k}": v for k, v in mean_losses.items()}, "atoms": int(counts[-2]),
                          "seen": dict(self.seen), "lr": self.engine.get_lr()[0], "seconds": elapsed,
                          "loader_wait_share": wait / elapsed,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "molecules_per_s": sum(molecules.values()) / elapsed, "atoms_per_s": counts[-2].item() / elapsed}
                history.append(record)
                if self.rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}", mol_s=f"{record['molecules_per_s']:.0f}")
                    if self.step % t.log_every == 0 or self.step == last or counts[-1] > 0:
                        self._log(record)
                if counts[-1] > 0:  # a rank was asked to stop: all ranks checkpoint this step and exit
                    stopped = True
                    if self.rank == 0:
                        print(f"\n[pretrain] stop signal: checkpointing step {self.step} on every rank", flush=True)
                    break
                v = self.cfg.validation
                if v.every and self.step % v.every == 0 and self.step < t.max_steps:
                    self.validate()
                if self.step % t.save_every == 0 and self.step < last:
                    self.save()
            if history or stopped:
                self.save()
            if not stopped and self.step >= t.max_steps:  # (again, if a run was stopped while closing)
                export = self.export()
                self.validate()
                self.alignment(export)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self._wandb_run is not None:
                self._wandb_run.finish()
        return history

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
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb_run.log(flat, step=self.step)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Every loss by name on each source's held-out molecules (fixed conformer, masks and
        noise), averaged over molecules and ranks; logged as a ``valid`` record."""
        if not self.valid_urls:
            return {}
        cfg, model = self.cfg, self.engine.module
        if self._valid_batches is None:
            v = cfg.validation
            self._valid_batches = {
                k: fixed_batches(urls, max_atoms=cfg.data.max_atoms, max_molecules=v.max_molecules,
                                 max_spd=model.cfg.max_spd, max_path=model.cfg.max_path)
                for k, urls in self.valid_urls.items()}
        record: dict = {"split": "valid", "step": self.step}
        # Each rank's held-out batches on their own: the validation figures do not depend on the
        # world size (and weight-0 repeats do not enter other ranks' negatives).
        objective = dataclasses.replace(cfg.objective, gather_negatives="off")
        was_training = model.training
        model.eval()
        try:
            for source, batches in self._valid_batches.items():
                if not batches:
                    continue
                sums: dict[str, torch.Tensor] = {}
                n = torch.zeros(1, dtype=torch.float64)
                # Every rank runs the same number of forward passes on the same modality (ZeRO-3
                # gathers parameters collectively); a rank with no batch left repeats one at weight 0.
                for i in range((len(batches) + self.world - 1) // self.world):
                    j = i * self.world + self.rank
                    batch = move(batches[j if j < len(batches) else 0], self.device)
                    weight = float(batch["mask"].shape[0]) if j < len(batches) else 0.0
                    gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 7919 + j)
                    with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                         enabled=cfg.train.precision == "bf16"):
                        losses = pretraining_losses(model, batch, objective, gen,
                                                    train_feature_learners=cfg.stage == 1)
                    for k, val in losses.items():
                        sums[k] = sums.get(k, 0.0) + val.detach().double().cpu() * weight
                    n += weight
                keys = sorted(sums)
                values = torch.cat([torch.stack([sums[k] for k in keys]).reshape(-1), n])
                if self.world > 1:
                    values = values.to(self.device)
                    torch.distributed.all_reduce(values)
                    values = values.cpu()
                total = values[-1].item()
                for k, val in zip(keys, values[:-1].tolist()):
                    record[f"valid/{source}/{k}"] = val / total
                record[f"valid/{source}/molecules"] = int(total)
        finally:
            model.train(was_training)
        if self.rank == 0:
            self._log(record)
            shown = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.endswith("/total"))
            print(f"\n[pretrain] step {self.step} validation: {shown}", flush=True)
        return record

    def alignment(self, export: Path) -> dict | None:
        """The alignment report on held-out paired molecules, from the export (rank 0), written to
        ``output_dir/alignment.json`` and logged."""
        count = self.cfg.validation.alignment_count
        urls = self.valid_urls.get("paired")
        if self.rank != 0 or not count or not urls:
            return None
        from flexmol import load_pretrained
        from flexmol.evaluate.alignment import flat_metrics, format_report, records_report

        records = heldout_records(urls, count)
        if len(records) < 2:
            return None
        model = load_pretrained(export).to(self.device)
        report = records_report(model, records, max_atoms=self.cfg.data.max_atoms, device=self.device)
        report["data"] = list(urls)
        (self.out / "alignment.json").write_text(json.dumps(report, indent=1) + "\n")
        self._log({"split": "alignment", "step": self.step, **flat_metrics(report, prefix="alignment/")})
        print(format_report(report), flush=True)
        return report

    def _wandb(self):
        """A wandb run, offline unless the config says otherwise (with no network and an API key
        set, online mode hangs for minutes)."""
        if self.cfg.wandb.mode == "disabled":
            return None
        import wandb

        return wandb.init(project=self.cfg.wandb.project, mode=self.cfg.wandb.mode, dir=str(self.out),
                          config=_as_dict(self.cfg), resume="allow")

    def _on_signal(self, signum, frame) -> None:
        self._stop = True  # finish this step; the ranks agree on stopping, checkpoint and exit


def initial_weights(path: Path, model: FlexMol) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights ``init_from`` names (stage 2 from stage 1), read before DeepSpeed wraps the
    model so that the optimizer's fp32 copies (ZeRO 1/2) and partitions (ZeRO 3) are made from
    them: the run's export (``model.safetensors`` in ``path`` or ``path/export``), else the module
    weights of its latest checkpoint (written whole by ZeRO 1 and 2). Model only: optimizer,
    schedule and streams start afresh."""
    export = find_export(path)
    if export is not None:
        from safetensors.torch import load_file

        return load_file(export), export
    ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not (ckpt / "latest").is_file():
        raise ConfigError(f"config key 'init_from': {path} holds no model.safetensors and no checkpoint (no latest)")
    tag = (ckpt / "latest").read_text().strip()
    file = ckpt / tag / "mp_rank_00_model_states.pt"
    if not file.is_file() and any((ckpt / tag).glob("zero_pp_rank_*_model_states.pt")):
        raise ConfigError(f"config key 'init_from': {ckpt / tag} is a ZeRO-3 checkpoint (weights partitioned over "
                          "ranks); start from the run's export/ (written when it finishes)")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            saved = torch.load(file, map_location="cpu", weights_only=True)["module"]
    except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"config key 'init_from': cannot read {file} ({exc})") from None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if any(k not in saved or saved[k].shape != shape for k, shape in shapes.items()):
        raise ConfigError(f"config key 'init_from': {file} does not hold this model's weights whole (a ZeRO-3 "
                          f"checkpoint, or another model size); start from the run's export/ (written when it finishes)")
    return {k: saved[k] for k in shapes}, ckpt / tag


def find_export(path: Path) -> Path | None:
    """``model.safetensors`` in ``path`` or in ``path/export``, if there is one."""
    return next((p for p in (path / "model.safetensors", path / "export" / "model.safetensors") if p.is_file()), None)


def frozen_parameters(model: FlexMol, stage: int) -> dict[str, torch.nn.Parameter]:
    """The parameters a stage keeps fixed: in stage 2, the feature learners (the decoders' teachers)."""
    if stage == 1:
        return {}
    return {n: p for n, p in model.named_parameters() if n.startswith(("fl_2d.", "fl_3d."))}
