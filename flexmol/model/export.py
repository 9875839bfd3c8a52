"""Export directories: ``model.safetensors`` (the weights), ``model.yaml`` (the sizes) and
``checksums.json`` (the weights' sha256 and size). Loading runs no code from the files (safetensors
and YAML only) and refuses, with one line naming the file, weights that are not the ones written
(a flipped byte, a truncated copy), a file that is not safetensors, sizes the network cannot be
built with, and weights that do not fit those sizes.

An export written before checksums (no ``checksums.json``) still loads: its safetensors header and
every tensor's shape are checked as for any export, and an :class:`UnverifiedExportWarning` says
that its bytes could not be compared with the ones written.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from flexmol.config import ConfigError

WEIGHTS = "model.safetensors"
SHAPE = "model.yaml"
CHECKSUMS = "checksums.json"


class ExportError(ConfigError):
    """An export directory that cannot be loaded; the message names the file and the reason."""


class UnverifiedExportWarning(UserWarning):
    """An export without ``checksums.json``: its weights load without a checksum to compare."""


_SHA256: dict = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read once per version of the file (path, size, mtime) in a process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def save_pretrained(model, path):
    """Write ``model`` (a FlexMol) as an export directory: ``model.safetensors``, ``model.yaml`` and
    ``checksums.json`` (sha256 and size of the weights file). The checksums are written last: an
    export cut short while being written fails its check instead of loading half of it."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CHECKSUMS).unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    OmegaConf.save(OmegaConf.structured(model.cfg), path / SHAPE)
    weights = path / WEIGHTS
    sums = {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": file_sha256(weights)}}
    tmp = path / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(sums, indent=1) + "\n")
    tmp.replace(path / CHECKSUMS)
    return path


def _expected(path: Path) -> dict | None:
    """What ``checksums.json`` says of the weights file; None when there is no such file."""
    file = path / CHECKSUMS
    if not file.exists():
        return None
    try:
        entry = json.loads(file.read_text())[WEIGHTS]
        expected = {"bytes": int(entry["bytes"]), "sha256": str(entry["sha256"]).lower()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        why = f"no entry {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        raise ExportError(f"{file}: not a readable checksum file ({why}); the export is damaged") from None
    return expected


def verify_export(path: str | Path) -> bool:
    """Check the export in ``path`` without building the model: its files are there, the weights
    are the bytes ``checksums.json`` describes, and they are a readable safetensors file. True when
    the checksum was compared, False for an export without checksums (see the module's note);
    raises :class:`ExportError` naming the file otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                          f"(an export holds {WEIGHTS} + {SHAPE})")
    for name in (WEIGHTS, SHAPE):
        if not (path / name).is_file():
            raise ExportError(f"{path}: no {name} (not a FlexMol export)")
    weights = path / WEIGHTS
    expected = _expected(path)
    size = weights.stat().st_size
    if expected is not None:
        if size != expected["bytes"]:
            what = "truncated" if size < expected["bytes"] else "longer than written"
            raise ExportError(f"{weights}: {what} ({size} bytes; {CHECKSUMS} says {expected['bytes']}); "
                              "copy or export it again")
        if file_sha256(weights) != expected["sha256"]:
            raise ExportError(f"{weights}: checksum mismatch (sha256 differs from {CHECKSUMS}): the file is "
                              "damaged; copy or export it again")
    _read_header(weights)
    return expected is not None


def _read_header(weights: Path) -> dict:
    """Name -> shape of every tensor in a safetensors file (header only, all offsets checked)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 -- safetensors' own errors carry no common type
        raise ExportError(f"{weights}: not a readable safetensors file ({_first_line(exc)}); "
                          "truncated or not a FlexMol export") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def export_model_config(path: str | Path):
    """The :class:`ModelConfig` of the export in ``path`` (its ``model.yaml``), checked."""
    from flexmol.model.summary import model_config_file

    file = Path(path) / SHAPE
    if not file.is_file():
        raise ExportError(f"{Path(path)}: no {SHAPE} (not a FlexMol export)")
    try:
        return model_config_file(file)
    except ExportError:
        raise
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def check_export(path: str | Path) -> bool:
    """:func:`verify_export`, then the sizes in ``model.yaml`` checked and every tensor of the
    weights file matched against the model they describe (names and shapes, from the safetensors
    header; the model built on the meta device, so nothing is allocated). True when the checksum
    was compared; raises :class:`ExportError` naming the file otherwise."""
    import torch

    from flexmol.model.network import FlexMol

    path = Path(path)
    verified = verify_export(path)
    cfg = export_model_config(path)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in FlexMol(cfg).state_dict().items()}
    _check_fit(path, _read_header(path / WEIGHTS), want)
    return verified


def _check_fit(path: Path, have: dict, want: dict) -> None:
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and tuple(have[k]) != tuple(want[k])]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]}"
                 + (f": {tuple(have[v[0]])} in the file, {tuple(want[v[0]])} in the model" if v is wrong else "")
                 + ")" for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
                 if v]
        raise ExportError(f"{path / WEIGHTS}: the weights do not fit the sizes in {path / SHAPE}: tensors "
                          + "; ".join(parts))


def load_pretrained(path, _stacklevel: int = 2):
    """A FlexMol model from an export directory, in eval mode; see the module's note for what is
    checked (and weights holding NaN or infinite values are refused). Raises :class:`ExportError`
    (a :class:`ConfigError`) naming the file that is wrong."""
    import torch
    from safetensors.torch import load_file

    from flexmol.model.network import FlexMol

    path = Path(path)
    if not check_export(path):
        warnings.warn(f"{path}: no {CHECKSUMS} (an export written before checksums); its weights load "
                      "unverified", UnverifiedExportWarning, stacklevel=_stacklevel)
    model = FlexMol(export_model_config(path))
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{weights}: not a readable safetensors file ({_first_line(exc)})") from None
    _check_fit(path, {k: tuple(v.shape) for k, v in state.items()},
               {k: tuple(v.shape) for k, v in model.state_dict().items()})
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
                          "the run that wrote it diverged")
    model.load_state_dict(state, strict=True)
    return model.eval()
