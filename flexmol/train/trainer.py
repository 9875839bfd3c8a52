"""The pre-training loop under DeepSpeed: both stages, mixed streams, checkpoints that resume exactly.

Stateful in one place: a checkpoint holds DeepSpeed's model, optimizer and scheduler states plus
the trainer's client state (step and every stream's position). Per-step randomness (atom masking,
coordinate noise) comes from a generator seeded by (seed, step, rank), so no RNG state needs saving
and a resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from flexmol.config import ConfigError
from flexmol.data.collate import move
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, dataset_urls
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


def _checked_urls(cfg: PretrainConfig, key: str, world: int) -> list[str]:
    """The shards of ``data.<key>``, refusing at start-up what would fail or hang later."""
    urls = []
    for d in getattr(cfg.data, key):
        if not (Path(d) / "manifest.json").exists():
            raise ConfigError(f"config key 'data.{key}': {d} is not a finished dataset (no manifest.json)")
        got = dataset_urls([d])
        if not got:
            raise ConfigError(f"config key 'data.{key}': {d} holds no molecules")
        urls += got
    need = world * max(1, cfg.data.num_workers)
    if len(urls) < need:
        raise ConfigError(f"config key 'data.{key}': {len(urls)} shards for {world} ranks x "
                          f"{max(1, cfg.data.num_workers)} loader workers; need at least {need} (smaller job.shard_size)")
    return urls


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
        sources = {k: _checked_urls(cfg, k, self.world) for k in SOURCE_NAMES if getattr(cfg.data, k)}
        self.schedule = MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in cfg.data.mix], list(sources))

        torch.manual_seed(cfg.train.seed)
        model = FlexMol(model_config(cfg.model.size))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
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
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        self.engine.checkpoint_engine = _weights_only_engine(self.engine.checkpoint_engine)
        self.step = 0
        taken = {k: 0 for k in sources}
        if cfg.init_from and cfg.resume == "none":
            self._init_from(Path(cfg.init_from))
        client = self._resume()
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
            self.schedule, t.seed, step=self.step * t.grad_accum)
        self._stop = False

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> dict | None:
        if self.cfg.resume == "none":
            return None
        directory, tag = (self.ckpt_dir, None) if self.cfg.resume == "auto" else (Path(self.cfg.resume).parent,
                                                                                    Path(self.cfg.resume).name)
        if not (directory / "latest").exists() and tag is None:
            return None  # resume=auto on a fresh output directory: start from scratch
        _, client = self.engine.load_checkpoint(str(directory), tag=tag)
        return client

    def _init_from(self, path: Path) -> None:
        """Stage 2 starts from stage 1's weights (its output_dir, checkpoints/ or an export):
        model only; optimizer, schedule and streams start afresh."""
        export = path / "model.safetensors"
        if export.exists():
            from safetensors.torch import load_file

            self.engine.module.load_state_dict(load_file(export), strict=True)
            return
        ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if not (ckpt / "latest").exists():
            raise ConfigError(f"config key 'init_from': {path} holds no checkpoint (no latest) and no model.safetensors")
        self.engine.load_checkpoint(str(ckpt), load_module_only=True, load_optimizer_states=False,
                                    load_lr_scheduler_states=False)

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
        preempted run would."""
        t, model = self.cfg.train, self.engine.module
        stop_after = stop_after if stop_after is not None else t.stop_after
        last = min(t.max_steps, stop_after) if stop_after is not None else t.max_steps
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log_path = self.out / "metrics.jsonl"
        bar = run = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.step, unit="step", desc=f"stage {self.cfg.stage}", mininterval=1.0)
            run = self._wandb()
        history = []
        try:
            while self.step < last and not self._stop:
                started = time.perf_counter()
                wait = 0.0
                record = {"step": self.step + 1, "molecules": {}}
                for micro in range(t.grad_accum):
                    w0 = time.perf_counter()
                    _, source, batch = next(self.stream)
                    wait += time.perf_counter() - w0
                    gen = torch.Generator().manual_seed(hash((t.seed, self.step, micro, self.rank)) & 0x7FFFFFFF)
                    batch = move(batch, self.engine.device)
                    with torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                        losses = pretraining_losses(model, batch, self.cfg.objective, gen)
                    self.engine.backward(losses["total"])
                    self.engine.step()
                    n = int(batch["mask"].shape[0])
                    record["molecules"][source] = record["molecules"].get(source, 0) + n * self.world
                    self.seen[source] += n * self.world
                    record["atoms"] = record.get("atoms", 0) + int(batch["mask"].sum()) * self.world
                    for k, v in self._mean_over_ranks(losses).items():
                        record[f"loss/{k}"] = record.get(f"loss/{k}", 0.0) + v / t.grad_accum
                self.step += 1
                elapsed = time.perf_counter() - started
                grad_norm = self.engine.get_global_grad_norm()
                mols = sum(record["molecules"].values())
                record.update(seen=dict(self.seen), lr=self.engine.get_lr()[0], seconds=elapsed, loader_wait_share=wait / elapsed,
                              grad_norm=float(grad_norm) if grad_norm is not None else None,
                              molecules_per_s=mols / elapsed, atoms_per_s=record["atoms"] / elapsed)
                history.append(record)
                if self.rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}", mol_s=f"{record['molecules_per_s']:.0f}")
                    if self.step % t.log_every == 0 or self.step == last:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if run is not None:
                            run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=self.step)
                if self.step % t.save_every == 0:
                    self.save()
            if self._stop or self.step < t.max_steps:
                self.save()
            else:
                self.save()
                self.export()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if run is not None:
                run.finish()
        return history

    def _wandb(self):
        """A wandb run, offline unless the config says otherwise (with no network and an API key
        set, online mode hangs for minutes)."""
        if self.cfg.wandb.mode == "disabled":
            return None
        import wandb

        return wandb.init(project=self.cfg.wandb.project, mode=self.cfg.wandb.mode, dir=str(self.out),
                          config=_as_dict(self.cfg), resume="allow")

    def _mean_over_ranks(self, losses: dict) -> dict[str, float]:
        """Every loss averaged over the ranks (each rank holds its own batch), for logging."""
        keys = sorted(losses)
        values = torch.stack([losses[k].detach().float() for k in keys])
        if self.world > 1:
            torch.distributed.all_reduce(values)
            values /= self.world
        return dict(zip(keys, values.tolist()))

    def _on_signal(self, signum, frame) -> None:
        self._stop = True  # finish this step, checkpoint, exit
