"""Checkpoints of the pre-training loop: which one a run resumes from, loading and saving it with
the trainer's client state, and the weights ``init_from`` names.

A checkpoint is DeepSpeed's (model, optimizer and scheduler states, under
``output_dir/checkpoints/step-NNNNNNNN``, ``latest`` naming the last) plus a client state the
trainer gives: a dict that must hold the ``step`` (an int) and the ``stream`` state (a dict with
every rank's positions, ``ranks``). Everything is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from flexmol.config import ConfigError


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _checkpoint_globals() -> list:
    """The few plain DeepSpeed types a checkpoint's files hold, allow-listed for ``weights_only``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_engine(engine):
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


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("zero_pp_rank_*")))


class Checkpointer:
    """The checkpoints of the run writing into ``output_dir``: ``resume`` (none | auto | a path)
    says which one it continues from; ``model_size`` names the model in refusals."""

    def __init__(self, output_dir: Path, resume: str, model_size: str):
        self.directory = Path(output_dir) / "checkpoints"
        self.resume, self.model_size = resume, model_size

    def resume_target(self) -> tuple[Path, str] | None:
        """The checkpoint this run continues from: (checkpoints directory, tag). ``resume`` is
        ``auto`` (the latest in output_dir, if any), a checkpoint directory, a checkpoints
        directory (its latest) or a run's output_dir (its latest)."""
        resume = self.resume
        if resume == "none":
            return None

        def fail(why):
            raise ConfigError(f"config key 'resume': {why}")

        if resume == "auto":
            if not (self.directory / "latest").exists():
                return None
            ckpt, how = self.directory, "auto"
        else:
            path = Path(resume)
            if is_checkpoint(path):
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
        if not tag or "/" in tag or not is_checkpoint(ckpt / tag):
            fail(f"{how}: {ckpt / 'latest'} names '{tag}', which is not a checkpoint in {ckpt}; point resume at "
                 "one of its checkpoints, or resume=none to start afresh")
        return ckpt, tag

    def load(self, engine, directory: Path, tag: str) -> dict:
        """DeepSpeed's states of checkpoint ``directory/tag`` into ``engine``, and the client state
        it was saved with; a :class:`ConfigError` naming ``resume`` when it does not load."""
        where = directory / tag
        try:
            path, client = engine.load_checkpoint(str(directory), tag=tag)
        except Exception as exc:  # noqa: BLE001 -- whatever the files hold: one line, not a traceback
            why = _first_line(exc)
            if "state_dict" in why:
                why = f"it holds another model's weights (not model.size '{self.model_size}')"
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

    def save(self, engine, step: int, client: dict) -> None:
        """A checkpoint of ``step`` (tag ``step-NNNNNNNN``, every rank must call) with ``client`` as
        its client state."""
        engine.save_checkpoint(str(self.directory), tag=f"step-{step:08d}", client_state=client)

    def saved_step(self) -> str:
        """Where a run stopped now would resume, in words."""
        try:
            return "the checkpoint " + (self.directory / "latest").read_text().strip()
        except OSError:
            return "the start (no checkpoint)"


def load_initial_weights(path: Path, model: torch.nn.Module, model_size: str, say) -> Path:
    """The weights ``init_from`` names (:func:`initial_weights`) loaded into ``model``, strictly; a
    :class:`ConfigError` naming the key when they are another model's. An unverified export's
    warning is said once, in one line, through ``say`` (None: not said). Returns where the weights
    came from."""
    from flexmol.model.export import UnverifiedExportWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedExportWarning)
        state, source = initial_weights(path, model)
    for w in caught:
        if not issubclass(w.category, UnverifiedExportWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif say is not None:
            say(f"warning: {w.message}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ConfigError(f"config key 'init_from': {source} holds the weights of another model "
                          f"(not model.size '{model_size}')") from None
    return source


def initial_weights(path: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], Path]:
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
