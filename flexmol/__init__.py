"""FlexMol: molecular pre-training on incomplete 2D/3D data."""
__version__ = "0.1.0"
