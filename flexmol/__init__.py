"""FlexMol: molecular pre-training on incomplete 2D/3D data."""
__version__ = "0.1.0"


def save_pretrained(model, path):
    """Write ``model`` (a FlexMol) as an export directory: ``model.safetensors`` + ``model.yaml`` +
    ``checksums.json`` (the weights' sha256)."""
    from flexmol.model.export import save_pretrained as save

    return save(model, path)


def load_pretrained(path):
    """A FlexMol model from an export directory, in eval mode. Loading runs no code from the files:
    safetensors and YAML only. Damaged or foreign files (a checksum mismatch, a truncated or
    non-safetensors weights file, sizes that do not fit the weights or this machine's memory) raise
    :class:`flexmol.model.export.ExportError` (a ``ConfigError``) naming the file."""
    from flexmol.model.export import load_pretrained as load

    return load(path, _stacklevel=3)
