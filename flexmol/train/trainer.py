"""The pre-training loop under DeepSpeed: both stages, mixed streams, checkpoints that resume exactly.

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

import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from flexmol.config import ConfigError
from flexmol.data.collate import move
from flexmol.data.integrity import DataError, dataset_shards, verify_checksums
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, fixed_batches, heldout_records
from flexmol.model import FlexMol
from flexmol.model.summary import build_model, model_config
from flexmol.objectives import pretraining_losses
from flexmol.train.config import PretrainConfig, warmup_steps
from flexmol.train.schedule import lr_factor

SOURCE_NAMES = ("paired", "single_2d", "single_3d")
MODALITY = {"paired": "paired", "single_2d": "2d", "single_3d": "3d"}
# Per source, cumulative over the run (all ranks): for a batch of B molecules padded to N atoms
# (n_i each), atoms += sum n_i, atom_pairs += sum n_i^2, padded_atoms += B*N, padded_pairs += B*N^2,
# batch_pairs += B^2. With the molecules seen they give the run's compute exactly for a network whose
# cost is polynomial in atoms (per-atom layers, an O(n^2) pair track, in-batch negatives).
WORK = ("atoms", "atom_pairs", "padded_atoms", "padded_pairs", "batch_pairs")


def batch_work(mask: torch.Tensor) -> torch.Tensor:
    """:data:`WORK` of one batch from its [B, N] atom mask (float64, on the host)."""
    n = mask.sum(dim=1, dtype=torch.float64)
    b, width = mask.shape
    return torch.tensor([n.sum().item(), (n * n).sum().item(), b * width, b * width * width, b * b],
                        dtype=torch.float64)


class DivergedError(RuntimeError):
    """The losses stopped being finite numbers; the message (one line) names the step and losses."""


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


def _checked_urls(dirs, key: str, modality: str, shards: list | None = None) -> list[str]:
    """The shards of the datasets ``dirs`` given as config key ``key``, refusing at start-up what
    would fail later (:func:`flexmol.data.integrity.dataset_shards`: every shard the manifest lists
    present with its recorded size). The checked shards are appended to ``shards``."""
    urls = []
    for d in dirs:
        got = dataset_shards(d, key, modality)
        if shards is not None:
            shards.extend(got)
        urls += [s["url"] for s in got if s["samples"] > 0]
    return urls


def split_sources(cfg: PretrainConfig, shards: list | None = None
                  ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Training and held-out shards per source, and notes on what was decided. A source with
    held-out directories in ``validation.<source>`` trains on all its shards; otherwise each of its
    datasets holds out its last ``validation.holdout_shards`` shards when it has more than that.
    Every dataset's shards are checked (and appended to ``shards``, for the checksums)."""
    train, valid, notes = {}, {}, []
    v = cfg.validation
    for key in SOURCE_NAMES:
        data_dirs, valid_dirs = getattr(cfg.data, key), getattr(v, key)
        both = {str(Path(d).resolve()) for d in valid_dirs} & {str(Path(d).resolve()) for d in data_dirs}
        if both:
            raise ConfigError(f"config key 'validation.{key}': {sorted(both)} also in data.{key}; held-out data "
                              "must not be trained on")
        if valid_dirs:
            valid[key] = _checked_urls(valid_dirs, f"validation.{key}", MODALITY[key], shards)
        if not data_dirs:
            continue
        train[key] = []
        for d in data_dirs:
            got = _checked_urls([d], f"data.{key}", MODALITY[key], shards)
            if not valid_dirs and v.holdout_shards and len(got) > v.holdout_shards:
                got, out = got[:-v.holdout_shards], got[-v.holdout_shards:]
                valid.setdefault(key, []).extend(out)
                notes.append(f"{key}: {d}: {len(out)} of {len(got) + len(out)} shards held out for validation")
            elif not valid_dirs:
                notes.append(f"{key}: {d}: no validation ({len(got)} shard(s), validation.holdout_shards="
                             f"{v.holdout_shards}; set validation.{key}=[DIR] for a held-out dataset)")
            train[key] += got
    return train, valid, notes


def subset_notes(cfg: PretrainConfig, sources: dict[str, list[str]], shards: list[dict]) -> list[str]:
    """``data.subset`` against the molecules of each source's training shards (``shards``: the dicts
    of :func:`split_sources`): a :class:`ConfigError` naming the key when a subset is larger than its
    source; otherwise a note per subset."""
    samples = {s["url"]: s["samples"] for s in shards}
    notes = []
    for key, size in cfg.data.subset.items():
        held = sum(samples[u] for u in sources.get(key, []))
        if size > held:
            raise ConfigError(f"config key 'data.subset.{key}': {size} molecules, but the training shards of "
                              f"data.{key} hold {held}")
        notes.append(f"{key}: the first {size} of its {held} molecules in a fixed permutation (data.subset.{key}, "
                     f"data.subset_seed={cfg.data.subset_seed})")
    return notes


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


def _object_gather(world: int):
    """A function of an object giving every rank's one, in rank order (the findings of
    :func:`flexmol.data.integrity.verify_checksums`, a bad record met while training)."""
    def gather(items):
        if torch.cuda.is_available():  # the NCCL object collective runs on this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        out = [None] * world
        torch.distributed.all_gather_object(out, items)
        return out

    return gather


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("zero_pp_rank_*")))


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
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # what each rank can check alone comes first: a refused run starts no process group
        shards: list[dict] = []
        sources, self.valid_urls, notes = split_sources(cfg, shards)
        notes += subset_notes(cfg, sources, shards)
        check_output_dir(self.out)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg.data.verify_checksums:
            started = time.perf_counter()
            verify_checksums(shards, self.rank, self.world, _object_gather(self.world))
            if self.rank == 0:
                print(f"[pretrain] sha256 of {len(shards)} shard(s), {sum(s['bytes'] for s in shards) / 1e6:.1f} MB: "
                      f"as in their manifests ({time.perf_counter() - started:.1f} s)", flush=True)
        if self.rank == 0:
            for note in notes:
                print(f"[pretrain] {note}", flush=True)
        self.schedule = MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in cfg.data.mix], list(sources))

        torch.manual_seed(cfg.train.seed)
        model = build_model(model_config(cfg.model.size), f"config key 'model.size' ({cfg.model.size})")
        # A checkpoint in output_dir wins (the run resumes); otherwise init_from applies. An export
        # is loaded before DeepSpeed wraps the model, so that the optimizer's fp32 master copies
        # (ZeRO 1/2) and partitions (ZeRO 3) are made from it.
        target = self._resume_target()
        if cfg.init_from and target is None:
            from flexmol.model.export import UnverifiedExportWarning

            with warnings.catch_warnings(record=True) as caught:  # said once, by rank 0, in one line
                warnings.simplefilter("always", UnverifiedExportWarning)
                state, self.init_source = initial_weights(Path(cfg.init_from), model)
            for w in caught:
                if not issubclass(w.category, UnverifiedExportWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                elif self.rank == 0:
                    print(f"[pretrain] warning: {w.message}", file=sys.stderr, flush=True)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError:
                raise ConfigError(f"config key 'init_from': {self.init_source} holds the weights of another model "
                                  f"(not model.size '{cfg.model.size}')") from None
        # Stage 2: the feature learners are frozen teachers. Outside the optimizer (AdamW's weight
        # decay and momentum would move them even with zero gradients) and without gradients, set
        # once before DeepSpeed sees the model.
        self.frozen = frozen_parameters(model, cfg.stage)
        for p in self.frozen.values():
            p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        t = cfg.train
        warmup = warmup_steps(t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup, t.max_steps, t.decay, t.min_lr_ratio))
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
        client = None
        self.resumed = target is not None
        if target is not None:
            client = self._load_checkpoint(*target)
        elif cfg.init_from and self.rank == 0:
            print(f"[pretrain] weights from {self.init_source}", flush=True)
        self._wandb_run = None
        self.seen = {k: 0 for k in sources}  # molecules seen per source, all ranks
        self.skipped = {k: 0 for k in sources}  # bad records skipped per source, all ranks
        self.work = {k: dict.fromkeys(WORK, 0) for k in sources}  # see WORK, all ranks
        if client:
            self.step = client["step"]
            if self.step > t.max_steps:
                raise ConfigError(f"config key 'train.max_steps': {t.max_steps} is before step {self.step}, where the "
                                  f"resumed checkpoint {target[0] / target[1]} stands")
            self.seen.update(client.get("seen", {}))
            self.skipped.update(client.get("skipped", {}))
            for k, w in client.get("work", {}).items():
                self.work[k].update(w)
        d = cfg.data
        log = lambda m: print(f"[pretrain] rank {self.rank}: {m}", file=sys.stderr, flush=True)
        self.stream = MixedStream(
            {k: SourceStream(k, urls, max_atoms=d.max_atoms, seed=t.seed, shuffle_buffer=d.shuffle_buffer,
                             num_workers=d.num_workers, max_spd=self.engine.module.cfg.max_spd,
                             max_path=self.engine.module.cfg.max_path, on_bad_record=d.on_bad_record,
                             subset=d.subset.get(k), subset_seed=d.subset_seed, log=log)
             for k, urls in sources.items()},
            self.schedule, t.seed, step=self.step * t.grad_accum, grad_accum=t.grad_accum)
        for source in self.stream.sources.values():  # several ranks: their records merge when logged
            source.coverage.deferred = self.world > 1
        if client:
            self._resume_streams(client, target[0] / target[1])
            if self.rank == 0:
                print(f"[pretrain] resumed from {target[0] / target[1]} at step {self.step}", flush=True)
        self._valid_batches: dict[str, list[dict]] | None = None
        self._stop = False
        # the checkpoint's step is a validation step whose validation a stop signal cut out
        self._validation_due = bool(client and client.get("validation_due"))

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume_target(self) -> tuple[Path, str] | None:
        """The checkpoint this run continues from: (checkpoints directory, tag). ``resume`` is
        ``auto`` (the latest in output_dir, if any), a checkpoint directory, a checkpoints
        directory (its latest) or a run's output_dir (its latest)."""
        resume = self.cfg.resume
        if resume == "none":
            return None

        def fail(why):
            raise ConfigError(f"config key 'resume': {why}")

        if resume == "auto":
            if not (self.ckpt_dir / "latest").exists():
                return None
            ckpt, how = self.ckpt_dir, "auto"
        else:
            path = Path(resume)
            if _is_checkpoint(path):
                return path.parent, path.name
            ckpt = next((c for c in (path, path / "checkpoints") if (c / "latest").is_file()), None)
            if ckpt is None:
                fail(f"{path} is not a checkpoint (a checkpoint directory of model states, a checkpoints "
                     "directory or an output_dir with a 'latest' file; or none, auto)")
            how = str(path)
        try:
            tag = (ckpt / "latest").read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{how}: cannot read {ckpt / 'latest'} ({_first_line(exc)})")
        if not tag or "/" in tag or not _is_checkpoint(ckpt / tag):
            fail(f"{how}: {ckpt / 'latest'} names '{tag}', which is not a checkpoint in {ckpt}; point resume at "
                 "one of its checkpoints, or resume=none to start afresh")
        return ckpt, tag

    def _load_checkpoint(self, directory: Path, tag: str) -> dict:
        """DeepSpeed's states and the trainer's client state of checkpoint ``directory/tag``; a
        :class:`ConfigError` naming ``resume`` when it does not load."""
        where = directory / tag
        try:
            path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        except Exception as exc:  # noqa: BLE001 -- whatever the files hold: one line, not a traceback
            why = _first_line(exc)
            if "state_dict" in why:
                why = f"it holds another model's weights (not model.size '{self.cfg.model.size}')"
            raise ConfigError(f"config key 'resume': checkpoint {where} does not load: {why}") from None
        if path is None or not isinstance(client, dict) or not isinstance(client.get("step"), int) \
                or not isinstance(client.get("stream"), dict):
            raise ConfigError(f"config key 'resume': {where} is not a checkpoint of this trainer (no model states "
                              "or no step and stream state)")
        if "ranks" not in client["stream"]:
            raise ConfigError(f"config key 'resume': {where} holds its streams' state as batches taken, which this "
                              f"version does not replay (streams resume from their positions); start a new run from "
                              f"its weights: resume=none init_from={directory}")
        return client

    def _stream_layout(self) -> dict:
        """What the meaning of a stream position depends on, by config key: a checkpoint's
        positions resume only a run that agrees on each."""
        d = self.cfg.data
        layout = {"world size": self.world, "data.num_workers": max(1, d.num_workers),
                  "data.shuffle_buffer": max(1, d.shuffle_buffer), "train.seed": self.cfg.train.seed,
                  "data.subset_seed": d.subset_seed}
        for k, s in self.stream.sources.items():
            layout[f"data.{k}"] = f"{s.plan.records} training molecules in {len(s.urls)} shards"
            layout[f"data.subset.{k}"] = d.subset.get(k)
        return layout

    def _resume_streams(self, client: dict, where: Path) -> None:
        """Every stream at this rank's position in ``client`` (and the records seen), after checking
        that the run reads its data as the checkpoint's did."""
        saved, layout = client["stream"].get("layout", {}), self._stream_layout()
        for key, now in layout.items():
            if key in saved and saved[key] != now:
                name = "resume" if key == "world size" else key
                raise ConfigError(f"config key '{name}': checkpoint {where} was written with {key} {saved[key]}, this "
                                  f"run has {now}; the streams' positions depend on it (resume with the same, or "
                                  "resume=none to start afresh)")
        try:
            self.stream.load_state_dict({"step": client["stream"]["step"],
                                         "sources": client["stream"]["ranks"][self.rank]})
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'resume': checkpoint {where} holds no usable stream state for rank "
                              f"{self.rank} ({type(exc).__name__}: {exc}); resume=none starts afresh") from None
        # the schedule's position counts micro-batches: a run resumed with another train.grad_accum
        # draws its sources at the optimizer step it stands at (the streams' positions do not depend on it)
        self.stream.step = self.step * self.cfg.train.grad_accum
        for k, bits in client.get("coverage", {}).items():
            if k in self.stream.sources:
                try:
                    self.stream.sources[k].coverage.load_state_dict(bits)
                except ValueError as exc:
                    raise ConfigError(f"config key 'resume': checkpoint {where}: data.{k}: {exc}") from None

    def _merge_coverage(self) -> None:
        """The records every rank's batches held since the last merge, added to every rank's map
        (one gather of a few steps' record numbers), so that ``unique`` counts all ranks."""
        sources = self.stream.sources
        mine = {k: s.coverage.take_pending() for k, s in sources.items()}
        parts = _object_gather(self.world)(mine) if self.world > 1 else [mine]
        for k, s in sources.items():
            s.coverage.merge([p[k] for p in parts])

    def data_seen(self) -> dict[str, dict]:
        """Per source: molecules seen, unique molecules seen, the molecules it can yield (its subset
        or all its records) and passes over them (seen / those), every rank counted. Exact after
        :meth:`_merge_coverage`."""
        out = {}
        for k, s in self.stream.sources.items():
            size = s.plan.subset_records
            out[k] = {"seen": self.seen[k], "unique": s.coverage.unique, "of": size, "passes": self.seen[k] / size}
        return out

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
        """A checkpoint of this step: DeepSpeed's states, and as client state the step, every rank's
        stream positions (gathered: ZeRO 1 and 2 reload rank 0's client state on every rank), the
        records seen (merged over the ranks) and the counts."""
        self._merge_coverage()
        state = self.stream.state_dict()
        ranks = _object_gather(self.world)(state["sources"]) if self.world > 1 else [state["sources"]]
        stream = {"step": state["step"], "ranks": ranks, "layout": self._stream_layout()}
        coverage = {k: s.coverage.state_dict() for k, s in self.stream.sources.items()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step-{self.step:08d}",
                                    client_state={"step": self.step, "stream": stream, "coverage": coverage,
                                                  "seen": dict(self.seen), "skipped": dict(self.skipped),
                                                  "work": {k: dict(w) for k, w in self.work.items()},
                                                  "validation_due": self._validation_due})

    def _saved_step(self) -> str:
        try:
            return "the checkpoint " + (self.ckpt_dir / "latest").read_text().strip()
        except OSError:
            return "the start (no checkpoint)"

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
        if self.step >= last and self.step < t.max_steps:
            if self.rank == 0:
                print(f"[pretrain] train.stop_after={stop_after}: the run stands at step {self.step} already; "
                      "nothing to do", flush=True)
            return []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        self._wandb_run = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_metrics(closing=self.step >= t.max_steps)
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.step, unit="step", desc=f"stage {self.cfg.stage}", mininterval=1.0)
            self._wandb_run = self._wandb()
        train_feature_learners = self.cfg.stage == 1
        history = []
        stopped = False  # agreed by every rank (the signal handler's flag is this rank's only)
        nonfinite = 0  # optimizer steps in a row with a loss that is not finite
        try:
            if self._validation_due:  # the validation of the checkpoint's step, stopped before it ran
                self.validate()
                self._validation_due = False
            while self.step < last:
                started = time.perf_counter()
                sums: dict[str, torch.Tensor] = {}
                computed: dict[str, int] = {}
                # molecules per source, skipped records per source, atoms, stop
                counts = torch.zeros(2 * len(SOURCE_NAMES) + 2, dtype=torch.float64)
                work = torch.zeros(len(SOURCE_NAMES), len(WORK), dtype=torch.float64)
                skipped_before = {k: s.skipped for k, s in self.stream.sources.items()}
                # every micro-batch of the step first: bad data met by any rank stops every rank
                # here, before the step's first collective (contrastive negatives, ZeRO reductions)
                drawn, failure = [], None
                for micro in range(t.grad_accum):
                    try:
                        drawn.append(next(self.stream)[1:])
                    except DataError as exc:
                        failure = str(exc)
                        break
                wait = time.perf_counter() - started
                self._agree_on_data(failure)
                for micro, (source, batch) in enumerate(drawn):
                    counts[SOURCE_NAMES.index(source)] += batch["mask"].shape[0]
                    counts[-2] += int(batch["num_atoms"].sum())  # still on the host: no device sync
                    work[SOURCE_NAMES.index(source)] += batch_work(batch["mask"])
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
                for k, s in self.stream.sources.items():
                    counts[len(SOURCE_NAMES) + SOURCE_NAMES.index(k)] = s.skipped - skipped_before[k]
                counts[-1] = float(self._stop)
                mean_losses, counts = self._reduce({k: v / computed[k] for k, v in sums.items()},
                                                   torch.cat([counts, work.reshape(-1)]))
                counts, work = counts[:-work.numel()], counts[-work.numel():].reshape(work.shape)
                self.step += 1
                elapsed = time.perf_counter() - started
                molecules = {k: int(counts[i]) for i, k in enumerate(SOURCE_NAMES) if counts[i] > 0}
                for k, n in molecules.items():
                    self.seen[k] += n
                    for name, value in zip(WORK, work[SOURCE_NAMES.index(k)].tolist()):
                        self.work[k][name] += int(value)
                for i, k in enumerate(SOURCE_NAMES):
                    if k in self.skipped:
                        self.skipped[k] += int(counts[len(SOURCE_NAMES) + i])
                grad_norm = self.engine.get_global_grad_norm()
                record = {"split": "train", "step": self.step, "molecules": molecules,
                          **{f"loss/{k}": v for k, v in mean_losses.items()}, "atoms": int(counts[-2]),
                          "seen": dict(self.seen), "work": {k: dict(w) for k, w in self.work.items()},
                          "skipped_records": {k: n for k, n in self.skipped.items() if n},
                          "lr": self.engine.get_lr()[0], "seconds": elapsed,
                          "loader_wait_share": wait / elapsed,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "molecules_per_s": sum(molecules.values()) / elapsed, "atoms_per_s": counts[-2].item() / elapsed}
                history.append(record)
                diverged = sorted((f"loss/{k}" for k, v in mean_losses.items() if not math.isfinite(v)),
                                  key=lambda k: k != "loss/total")
                logged = self.step % t.log_every == 0 or self.step == last or counts[-1] > 0 or bool(diverged)
                if logged:  # the same on every rank (reduced values): the ranks merge what they saw
                    self._merge_coverage()
                    seen = self.data_seen()
                    record["unique"] = {k: v["unique"] for k, v in seen.items()}
                    record["passes"] = {k: v["passes"] for k, v in seen.items()}
                if self.rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}", mol_s=f"{record['molecules_per_s']:.0f}")
                    if logged:
                        self._log(record)
                # the same on every rank (reduced losses): all go on, or all stop without saving
                nonfinite = nonfinite + 1 if diverged else 0
                if diverged and self.rank == 0:
                    print(f"\n[pretrain] step {self.step}: {diverged[0]} is not finite ({nonfinite} step(s) in a row; "
                          f"train.max_nonfinite_steps={t.max_nonfinite_steps})", file=sys.stderr, flush=True)
                if nonfinite >= t.max_nonfinite_steps:
                    raise DivergedError(
                        f"steps {self.step - nonfinite + 1}-{self.step}: {diverged[0]} not finite "
                        f"{nonfinite} step(s) in a row (train.max_nonfinite_steps): the run diverged (train.lr "
                        f"{t.lr:g}; a lower train.lr or a longer train.warmup_steps may help); nothing saved after "
                        f"{self._saved_step()}")
                v = self.cfg.validation
                due = bool(v.every) and self.step % v.every == 0 and self.step < t.max_steps
                if counts[-1] > 0:  # a rank was asked to stop: all ranks checkpoint this step and exit
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
            if self.rank == 0 and (history or stopped):
                print("[pretrain] data seen (all ranks): " + "; ".join(
                    f"{k} {v['seen']} molecules, {v['unique']} unique of {v['of']} ({v['passes']:.2f} passes)"
                    for k, v in self.data_seen().items()), flush=True)
            if self.rank == 0 and any(self.skipped.values()):
                print(f"[pretrain] data.on_bad_record=skip: bad records skipped so far (all ranks): "
                      + ", ".join(f"data.{k} {n}" for k, n in self.skipped.items() if n), file=sys.stderr, flush=True)
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
            messages = _object_gather(self.world)(failure)
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

    def _trim_metrics(self, closing: bool) -> None:
        """Before appending: ``metrics.jsonl`` keeps the records of the steps up to this run's
        starting point, so that a step redone after a resume appears once. A resumed run drops the
        records after its checkpoint's step (and, when it resumes to close, the closing records of
        that step); a run starting afresh sets an earlier run's file aside (renamed, not deleted)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        if not self.resumed:
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
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill while it was written
                dropped += bool(line.strip())
                continue
            if step > self.step or (closing and step == self.step and record.get("split") != "train"):
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            print(f"[pretrain] resuming at step {self.step}: {dropped} record(s) of later steps dropped from "
                  f"{path.name} (they are redone)", flush=True)

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
            notes: list[str] = []
            self._valid_batches = {
                k: fixed_batches(urls, max_atoms=cfg.data.max_atoms, max_molecules=v.max_molecules,
                                 max_spd=model.cfg.max_spd, max_path=model.cfg.max_path,
                                 on_bad_record=cfg.data.on_bad_record, notes=notes)
                for k, urls in self.valid_urls.items()}
            if notes and self.rank == 0:
                print(f"[pretrain] validation skips {len(notes)} bad held-out record(s); first: {notes[0]}",
                      file=sys.stderr, flush=True)
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
                sums, n = heldout_losses(model, batches, objective, seed=cfg.train.seed, device=self.device,
                                         precision=cfg.train.precision, train_feature_learners=cfg.stage == 1,
                                         rank=self.rank, world=self.world)
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

        records = heldout_records(urls, count, on_bad_record=self.cfg.data.on_bad_record)
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


def heldout_losses(model: FlexMol, batches: list[dict], objective, *, seed: int, device: torch.device,
                   precision: str = "fp32", train_feature_learners: bool = True, rank: int = 0, world: int = 1
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every loss by name summed over the molecules of this rank's share of fixed held-out
    ``batches`` (batch j: masks and noise from a generator seeded by (seed, j), so the figures do
    not depend on the world size), and the molecules counted: divide after summing over ranks.
    Every rank runs the same number of forward passes on the same modality (ZeRO-3 gathers
    parameters collectively); a rank with no batch left repeats one at weight 0."""
    sums: dict[str, torch.Tensor] = {}
    n = torch.zeros(1, dtype=torch.float64)
    for i in range((len(batches) + world - 1) // world):
        j = i * world + rank
        batch = move(batches[j if j < len(batches) else 0], device)
        weight = float(batch["mask"].shape[0]) if j < len(batches) else 0.0
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + j)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = pretraining_losses(model, batch, objective, gen, train_feature_learners=train_feature_learners)
        for k, val in losses.items():
            sums[k] = sums.get(k, 0.0) + val.detach().double().cpu() * weight
        n += weight
    return sums, n


def initial_weights(path: Path, model: FlexMol) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights ``init_from`` names (stage 2 from stage 1), read before DeepSpeed wraps the
    model so that the optimizer's fp32 copies (ZeRO 1/2) and partitions (ZeRO 3) are made from
    them: the run's export (``model.safetensors`` in ``path`` or ``path/export``), else the module
    weights of its latest checkpoint (written whole by ZeRO 1 and 2). Model only: optimizer,
    schedule and streams start afresh. An export's bytes are checked against its checksums.json
    (an :class:`~flexmol.model.export.UnverifiedExportWarning` when it has none), and weights that
    are not finite numbers are refused, as :func:`flexmol.load_pretrained` does."""
    if not path.is_dir():
        raise ConfigError(f"config key 'init_from': {path} {'is not a directory' if path.exists() else 'does not exist'}"
                          " (a stage-1 output_dir, its export/ or checkpoints/)")
    export = find_export(path)
    if export is not None:
        from safetensors.torch import load_file

        from flexmol.model.export import CHECKSUMS, ExportError, UnverifiedExportWarning, verify_export

        try:
            verified = verify_export(export.parent)  # the bytes the run wrote, before trusting them
        except ExportError as exc:
            raise ConfigError(f"config key 'init_from': {exc}") from None
        try:
            state = load_file(export)
        except Exception as exc:  # noqa: BLE001 -- whatever the file holds: one line, not a traceback
            raise ConfigError(f"config key 'init_from': {export} is not a readable safetensors file "
                              f"({_first_line(exc)})") from None
        if not verified:
            warnings.warn(f"config key 'init_from': {export.parent} has no {CHECKSUMS} (written before exports carried "
                          "checksums, or its writing was cut short); its weights load unverified",
                          UnverifiedExportWarning, stacklevel=2)
        return _finite(state, export), export
    ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not (ckpt / "latest").is_file():
        raise ConfigError(f"config key 'init_from': {path} holds no model.safetensors and no checkpoint (no latest)")
    try:
        tag = (ckpt / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config key 'init_from': cannot read {ckpt / 'latest'} ({_first_line(exc)})") from None
    if not tag or "/" in tag or not (ckpt / tag).is_dir():
        raise ConfigError(f"config key 'init_from': {ckpt / 'latest'} names '{tag}', which is not a checkpoint "
                          f"in {ckpt}")
    file = ckpt / tag / "mp_rank_00_model_states.pt"
    if not file.is_file() and any((ckpt / tag).glob("zero_pp_rank_*_model_states.pt")):
        raise ConfigError(f"config key 'init_from': {ckpt / tag} is a ZeRO-3 checkpoint (weights partitioned over "
                          "ranks); start from the run's export/ (written when it finishes)")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            saved = torch.load(file, map_location="cpu", weights_only=True)["module"]
        if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
            raise TypeError("no module weights in it")
    except Exception as exc:  # noqa: BLE001 -- whatever the file holds: one line, not a traceback
        raise ConfigError(f"config key 'init_from': cannot read {file} ({_first_line(exc)})") from None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if any(k not in saved or saved[k].shape != shape for k, shape in shapes.items()):
        raise ConfigError(f"config key 'init_from': {file} does not hold this model's weights whole (a ZeRO-3 "
                          f"checkpoint, or another model size); start from the run's export/ (written when it finishes)")
    return _finite({k: saved[k] for k in shapes}, file), ckpt / tag


def _finite(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """``state``, refused (naming a tensor and the file, as :func:`flexmol.load_pretrained` does)
    when a floating-point tensor holds NaN or infinite values."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"config key 'init_from': {file}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. "
                          f"{bad[0]}); the run that wrote it diverged")
    return state


def find_export(path: Path) -> Path | None:
    """``model.safetensors`` in ``path`` or in ``path/export``, if there is one."""
    return next((p for p in (path / "model.safetensors", path / "export" / "model.safetensors") if p.is_file()), None)


def frozen_parameters(model: FlexMol, stage: int) -> dict[str, torch.nn.Parameter]:
    """The parameters a stage keeps fixed: in stage 2, the feature learners (the decoders' teachers)."""
    if stage == 1:
        return {}
    return {n: p for n, p in model.named_parameters() if n.startswith(("fl_2d.", "fl_3d."))}
