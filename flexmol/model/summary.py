"""Model presets and parameter accounting."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from flexmol import config
from flexmol.config import ConfigError
from flexmol.model.network import FlexMol, ModelConfig, validate_model

CONFIG_DIR = config.PACKAGE_CONFIGS / "model"


def model_config(size_or_path: str, overrides: list[str] | None = None, key: str = "model.size") -> ModelConfig:
    """A preset name (tiny, small, base: ``flexmol/configs/model/NAME.yaml``) or a YAML path;
    ``key`` is the config key that named it, for the error when it names nothing."""
    path = config.resolve_resource("model", size_or_path, key=key)
    return model_config_file(path, overrides)


def model_config_file(path: Path, overrides: list[str] | None = None) -> ModelConfig:
    """The sizes in the YAML ``path``, checked (:func:`validate_model`); a bad value raises
    :class:`ConfigError` naming the file and the key."""
    try:
        cfg = config.build(ModelConfig, path, overrides=overrides)
        validate_model(cfg)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    return cfg


def parameter_table(model: FlexMol) -> list[tuple[str, int]]:
    """Parameters per top-level component, each shared tensor counted once (where it is owned)."""
    rows = [(name, sum(p.numel() for p in child.parameters())) for name, child in model.named_children()]
    return [(n, c) for n, c in rows if c]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def network(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg`` describes: an M2UMol for an M2UMol description
    (:class:`~flexmol.model.m2umol.M2UMolModelConfig`), a FlexMol otherwise."""
    from flexmol.model.m2umol import M2UMol, M2UMolModelConfig

    return M2UMol(cfg) if isinstance(cfg, M2UMolModelConfig) else FlexMol(cfg)


def meta_model(cfg: ModelConfig, where: str, error=ConfigError) -> FlexMol:
    """:func:`network` of ``cfg`` on the meta device: shapes only, nothing allocated, whatever the sizes."""
    try:
        with torch.device("meta"):
            return network(cfg)
    except RuntimeError as exc:  # a tensor whose element count overflows 64 bits
        raise error(f"{where}: sizes {sizes_text(cfg)} are too large to build a model with ({_first_line(exc)})") \
            from None


def parameter_count(cfg: ModelConfig, where: str = "model", error=ConfigError) -> int:
    """Parameters of ``FlexMol(cfg)``, counted on the meta device (nothing is allocated)."""
    return count(meta_model(cfg, where, error))


def sizes_text(cfg: ModelConfig) -> str:
    return "(" + ", ".join(f"{k}={getattr(cfg, k)}" for k in ("dim", "heads", "layers", "decoder_layers",
                                                                 "mm_layers", "ffn_mult", "num_kernels")) + ")"


def physical_memory() -> int | None:
    """Bytes of memory of this machine; None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _size_words(n: int) -> str:
    return f"{n:,} parameters ({4 * n / 2**30:,.1f} GiB as float32)"


_HINT = "lower dim, ffn_mult or the layer counts"


def check_fits_memory(cfg: ModelConfig, where: str, parameters: int | None = None, error=ConfigError) -> int:
    """The parameter count of ``FlexMol(cfg)`` (counted on the meta device, or ``parameters``);
    raises ``error`` naming ``where`` (the file or config key of the sizes) when its float32
    weights alone exceed this machine's memory, rather than fail allocating them."""
    n = parameter_count(cfg, where, error) if parameters is None else parameters
    memory = physical_memory()
    if memory and 4 * n > memory:
        raise error(f"{where}: sizes {sizes_text(cfg)} make {_size_words(n)}, more than this machine's "
                    f"{memory / 2**30:,.1f} GiB of memory; {_HINT}")
    return n


def build_model(cfg: ModelConfig, where: str, error=ConfigError, parameters: int | None = None) -> FlexMol:
    """:func:`network` of ``cfg``, its weights allocated and initialised, after :func:`check_fits_memory`
    (``parameters``: the count when already known); an allocation that fails all the same raises
    ``error`` naming ``where`` and the parameter count (one line, no traceback)."""
    n = check_fits_memory(cfg, where, parameters, error)
    try:
        return network(cfg)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        raise error(f"{where}: the weights of sizes {sizes_text(cfg)}, {_size_words(n)}, could not be allocated "
                    f"({_first_line(exc)}); {_HINT}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def summary_text(size: str) -> str:
    """The parameter table of a preset or YAML; the model is built on the meta device, so any
    sizes are counted without allocating their weights."""
    path = config.resolve_resource("model", size, key="model.size")
    cfg = model_config_file(path)
    model = meta_model(cfg, str(path))
    rows = parameter_table(model)
    width = max(len(n) for n, _ in rows)
    cwidth = max(12, *(len(f"{c:,}") for _, c in rows))
    lines = [f"FlexMol {size}: d={cfg.dim}, heads={cfg.heads}, layers={cfg.layers} per encoder (attention shared), "
             f"decoder_layers={cfg.decoder_layers}, mm_layers={cfg.mm_layers}, kernels={cfg.num_kernels}"]
    lines += [f"  {n:<{width}}  {c:>{cwidth},}" for n, c in rows]
    total = count(model)
    assert total == sum(c for _, c in rows)
    lines.append(f"total parameters: {total}")
    return "\n".join(lines)
