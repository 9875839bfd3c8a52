"""RDKit featurisation: molecules in, 2D graph features and 3D conformers out."""
from flexmol.chem.errors import Rejected
from flexmol.chem.featurizer import Featurizer, RawInput

__all__ = ["Featurizer", "RawInput", "Rejected"]
