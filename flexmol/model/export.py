"""Export directories: ``model.safetensors`` (the weights), ``model.yaml`` (the sizes) and
``checksums.json`` (the weights' sha256 and size). A FlexMol export's ``model.yaml`` holds its
sizes (:class:`~flexmol.model.network.ModelConfig`); an M2UMol export's says ``recipe: m2umol``
and adds its 2D encoder and its target modalities (names, kinds, widths, label keys:
:class:`~flexmol.model.m2umol.M2UMolModelConfig`), the vector modalities' statistics being
buffers among the weights. Loading runs no code from the files (safetensors
and YAML only) and refuses, with one line naming the file, weights that are not the ones written
(a flipped byte, a truncated copy), a file that is not safetensors, sizes the network cannot be
built with, and weights that do not fit those sizes.

The weights are written first and ``checksums.json`` last, each through a temporary file renamed
into place, so an export never holds a partly written file under its final name, and one whose
writing was cut short has no ``checksums.json``. Such an export, like one written before exports
carried checksums, still loads: its safetensors header and every tensor's shape are checked as for
any export, and an :class:`UnverifiedExportWarning` says that its bytes could not be compared with
the ones written.
"""
from __future__ import annotations

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


def cached_sha256(path: str | Path) -> str:
    """:func:`flexmol.data.shards.file_sha256` of ``path``, computed once per version of the file
    (path, size, modification time) in a process: a checkpoint or data file named by several runs
    is read once."""
    from flexmol.data.shards import file_sha256

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: ``path`` is either its old content or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(model, path):
    """Write ``model`` (a FlexMol or an M2UMol) as an export directory: ``model.safetensors``, ``model.yaml`` and
    ``checksums.json`` (sha256 and size of the weights file). Any old ``checksums.json`` is removed
    first and the new one written last, each file through a temporary file renamed into place: an
    export cut short while being written has no checksums (it loads with a warning, or fails its
    checks) and never holds half a file."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CHECKSUMS).unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = path / WEIGHTS
    _replace_atomically(weights, lambda tmp: save_file(state, str(tmp)))
    _replace_atomically(path / SHAPE, lambda tmp: OmegaConf.save(OmegaConf.structured(model.cfg), tmp))
    sums = {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": cached_sha256(weights)}}
    _replace_atomically(path / CHECKSUMS, lambda tmp: tmp.write_text(json.dumps(sums, indent=1) + "\n"))
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
    return _verify(Path(path))[0]


def _verify(path: Path) -> tuple[bool, dict]:
    """:func:`verify_export`'s answer and the weights' safetensors header (name -> shape)."""
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
        if cached_sha256(weights) != expected["sha256"]:
            raise ExportError(f"{weights}: checksum mismatch (sha256 differs from {CHECKSUMS}): the file is "
                              "damaged; copy or export it again")
    return expected is not None, _read_header(weights)


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


RECIPES = ("flexmol", "m2umol")


def export_model_config(path: str | Path):
    """The network description of the export in ``path`` (its ``model.yaml``), checked: a
    :class:`ModelConfig` (FlexMol), or with ``recipe: m2umol`` an :class:`M2UMolModelConfig`."""
    from flexmol import config
    from flexmol.model.summary import model_config_file

    file = Path(path) / SHAPE
    if not file.is_file():
        raise ExportError(f"{Path(path)}: no {SHAPE} (not a FlexMol export)")
    try:
        recipe = config.read_yaml(file).get("recipe", "flexmol")
        if recipe not in RECIPES:
            raise ExportError(f"{file}: recipe {recipe!r} is not one of {', '.join(RECIPES)} (an export of another "
                              "version, or not a FlexMol export)")
        if recipe == "flexmol":
            return model_config_file(file)
        from flexmol.model.m2umol import M2UMolModelConfig, validate_m2umol_model

        cfg = config.build(M2UMolModelConfig, file)
        validate_m2umol_model(cfg)
        return cfg
    except ExportError:
        raise
    except ConfigError as exc:
        raise ExportError(str(exc) if str(file) in str(exc) else f"{file}: {exc}") from None


def check_export(path: str | Path) -> bool:
    """:func:`verify_export`, then the sizes in ``model.yaml`` checked, every tensor of the weights
    file matched against the model they describe (names and shapes, from the safetensors header;
    the model built on the meta device, so nothing is allocated), and that model's float32 weights
    checked to fit in this machine's memory. True when the checksum was compared; raises
    :class:`ExportError` naming the file otherwise."""
    return _check(Path(path))[0]


def _check(path: Path):
    """:func:`check_export`'s answer, the checked :class:`ModelConfig` and its parameter count;
    each file read once."""
    from flexmol.model.summary import meta_model, check_fits_memory, count

    verified, have = _verify(path)
    cfg = export_model_config(path)
    meta = meta_model(cfg, str(path / SHAPE), ExportError)
    _check_fit(path, have, {k: tuple(v.shape) for k, v in meta.state_dict().items()})
    n = check_fits_memory(cfg, str(path / SHAPE), count(meta), ExportError)
    return verified, cfg, n


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
    """The model of an export directory (a FlexMol, or an M2UMol: ``model.yaml`` says), in eval mode; see the module's note for what is
    checked (and weights holding NaN or infinite values are refused). Raises :class:`ExportError`
    (a :class:`ConfigError`) naming the file that is wrong."""
    import torch
    from safetensors.torch import load_file

    from flexmol.model.summary import build_model

    path = Path(path)
    verified, cfg, n = _check(path)
    if not verified:
        warnings.warn(f"{path}: no {CHECKSUMS} (written before exports carried checksums, or its writing was cut "
                      "short before they were written); its weights load unverified", UnverifiedExportWarning,
                      stacklevel=_stacklevel)
    model = build_model(cfg, str(path / SHAPE), ExportError, n)
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{weights}: not a readable safetensors file ({_first_line(exc)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
                          "the run that wrote it diverged")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the file replaced since its header was checked
        raise ExportError(f"{weights}: the weights do not fit the sizes in {path / SHAPE} "
                          f"({_first_line(exc)})") from None
    return model.eval()
