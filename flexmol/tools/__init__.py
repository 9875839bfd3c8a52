"""The user tools over any exported checkpoint of either recipe: embeddings, explanations, retrieval.

``from flexmol.tools import Embedder``: molecule and atom embeddings from SMILES, files or featurised
datasets (:mod:`flexmol.tools.embedder`); the inputs they read are in :mod:`flexmol.tools.inputs`.
"""


def __getattr__(name: str):
    # Imported on first use: `flexmol --help` and the other commands do not pay for torch here.
    if name == "Embedder":
        from flexmol.tools.embedder import Embedder

        return Embedder
    if name in ("Molecule", "Reject", "read_molecules", "iter_molecules"):
        from flexmol.tools import inputs

        return getattr(inputs, name)
    raise AttributeError(f"module 'flexmol.tools' has no attribute {name!r}")


__all__ = ["Embedder", "Molecule", "Reject", "read_molecules", "iter_molecules"]
