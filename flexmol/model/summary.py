"""Model presets and parameter accounting."""
from __future__ import annotations

from pathlib import Path

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


def summary_text(size: str) -> str:
    cfg = model_config(size)
    model = FlexMol(cfg)
    rows = parameter_table(model)
    width = max(len(n) for n, _ in rows)
    lines = [f"FlexMol {size}: d={cfg.dim}, heads={cfg.heads}, layers={cfg.layers} per encoder (attention shared), "
             f"decoder_layers={cfg.decoder_layers}, mm_layers={cfg.mm_layers}, kernels={cfg.num_kernels}"]
    lines += [f"  {n:<{width}}  {c:>12,}" for n, c in rows]
    total = count(model)
    assert total == sum(c for _, c in rows)
    lines.append(f"total parameters: {total}")
    return "\n".join(lines)
