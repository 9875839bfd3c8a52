"""FlexMol: molecular pre-training on incomplete 2D/3D data."""
__version__ = "0.1.0"


def save_pretrained(model, path):
    """Write ``model`` (a FlexMol) as an export directory: ``model.safetensors`` + ``model.yaml``."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    OmegaConf.save(OmegaConf.structured(model.cfg), path / "model.yaml")
    return path


def load_pretrained(path):
    """A FlexMol model from an export directory (``model.safetensors`` + ``model.yaml``), in eval
    mode. Loading runs no code from the files: safetensors and YAML only."""
    from pathlib import Path

    from safetensors.torch import load_file

    from flexmol import config
    from flexmol.model import FlexMol, ModelConfig

    path = Path(path)
    for name in ("model.safetensors", "model.yaml"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: no {name} (not a FlexMol export)")
    model = FlexMol(config.build(ModelConfig, path / "model.yaml"))
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return model.eval()
