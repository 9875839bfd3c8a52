"""Embeddings of molecules from a checkpoint of either recipe: every space the network offers
(:meth:`FlexMol.spaces`), pooled per molecule or per atom, in input order.

Molecules are embedded in eval mode without gradients, sorted by size and cut into batches whose
padded size (molecules x largest molecule) stays within an atom budget, so that a batch holds
molecules of similar sizes and little padding; the results are put back in input order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from flexmol.config import ConfigError, FeaturizerConfig
from flexmol.tools.inputs import MODALITIES, Molecule, Reject, Source, read_molecules

# The user's input modality -> the batch modality the network runs (as in fine-tuning's input modes).
BATCH_MODALITY = {"2d": "2d", "3d": "3d", "both": "paired"}
DEFAULT_SPACE = "fused"


def symbols(z: np.ndarray) -> list[str]:
    """Element symbols of atomic numbers."""
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    return [table.GetElementSymbol(int(a)) for a in z]


def check_device(name) -> torch.device:
    """``name`` as a torch device; :class:`ConfigError` in one line when it is not one, or names a
    CUDA device this machine does not have."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name}: {'no CUDA device' if not count else f'{count} CUDA device(s)'} here")
    return device


class Embedder:
    """A checkpoint ready to embed molecules.

    ``checkpoint``: an export directory, or a pre-training ``output_dir`` holding ``export/``.
    ``device``: where the network runs. ``batch_size``: molecules per batch at most. ``max_atoms``:
    padded atoms per batch at most (a molecule larger than that goes alone). ``featurizer``: how
    SMILES become records (the featurisation defaults unless the model was trained otherwise).
    ``workers``: featurising processes (0: the machine's cores).
    """

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", batch_size: int = 256, max_atoms: int = 8192,
                 featurizer: Optional[FeaturizerConfig] = None, workers: int = 0):
        import flexmol
        from flexmol.finetune.config import export_dir

        for key, value in (("batch_size", batch_size), ("max_atoms", max_atoms)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} {value!r}: must be an integer of at least 1")
        self.device = check_device(device)
        self.path = export_dir(str(checkpoint))
        self.model = flexmol.load_pretrained(self.path).to(self.device).eval()
        self.batch_size, self.max_atoms, self.workers = batch_size, max_atoms, workers
        self.featurizer = featurizer or FeaturizerConfig(num_conformers=1)
        self.recipe = getattr(self.model.cfg, "recipe", "flexmol")
        self.dim = self.model.cfg.dim
        takes = getattr(self.model, "input_modalities", ("2d",))
        self.modalities = tuple(m for m, b in BATCH_MODALITY.items() if b in takes)

    def __repr__(self) -> str:
        return f"Embedder({str(self.path)!r}, recipe={self.recipe}, dim={self.dim}, modalities={self.modalities})"

    def check_modality(self, modality: str) -> None:
        """Refuse, naming the reason, a modality this checkpoint cannot embed."""
        if modality not in MODALITIES:
            raise ConfigError(f"modality {modality!r}: must be one of {', '.join(MODALITIES)}")
        if modality not in self.modalities:
            raise ConfigError(f"modality {modality}: the {self.recipe} checkpoint {self.path} embeds "
                              f"{' and '.join(self.modalities)} input only")

    def spaces(self, modality: str = "2d") -> tuple[str, ...]:
        """The embedding spaces of ``modality`` input, in the network's order."""
        self.check_modality(modality)
        return tuple(self.model.space_names(BATCH_MODALITY[modality]))

    def default_space(self, modality: str = "2d") -> str:
        """``fused`` (the embedding fine-tuning uses) where ``modality`` input has it, else its first space."""
        have = self.spaces(modality)
        return DEFAULT_SPACE if DEFAULT_SPACE in have else have[0]

    def read(self, source: Source, *, modality: str = "2d", conformers: Optional[str] = None,
             progress: bool = False, **kw) -> tuple[list[Molecule], list[Reject]]:
        """:func:`flexmol.tools.inputs.read_molecules` with this embedder's featuriser and workers."""
        self.check_modality(modality)
        return read_molecules(source, modality=modality, conformers=conformers, featurizer=self.featurizer,
                              workers=self.workers, progress=progress, **kw)

    def embed(self, molecules: Sequence[Molecule], modality: str = "2d", spaces: Optional[Sequence[str]] = None,
              atoms: bool = False, progress: bool = False) -> dict:
        """Embeddings of ``molecules`` ({space: float32 [n, d]}, rows in their order) in ``spaces``
        (default: :meth:`default_space`; any of :meth:`spaces`). With ``atoms``, also ``"atoms"``:
        {space: a list of float32 [n_i, d], one per molecule, its atoms in the record's order (the
        input's: the SMILES or SDF record as given, not the canonical SMILES)} for those of
        ``spaces`` the network gives per atom (an M2UMol network's ``fused`` and adapter spaces
        have no per-atom form)."""
        spaces = self._check_spaces(modality, spaces)
        batch_modality = BATCH_MODALITY[modality]
        records = [self._record(m, modality, batch_modality) for m in molecules]
        sizes = np.fromiter((len(r["z"]) for r in records), dtype=np.int64, count=len(records))
        out = {s: np.zeros((len(records), self.dim), dtype=np.float32) for s in spaces}
        per_atom = {s: [None] * len(records) for s in spaces} if atoms else None
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(records), desc="embedding", unit=" mol", file=sys.stderr, dynamic_ncols=True)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for idx in self.batches(sizes):
                    batch = self._batch([records[i] for i in idx])
                    got = self.model.spaces(batch)
                    for s in spaces:
                        out[s][idx] = got[s].float().cpu().numpy()
                    if atoms:
                        got = self.model.spaces(batch, atoms=True)
                        for s in [s for s in spaces if s in got]:
                            t = got[s].float().cpu().numpy()
                            for row, i in enumerate(idx):
                                per_atom[s][i] = t[row, :sizes[i]].copy()
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        if atoms:  # the spaces the network gives per atom
            out["atoms"] = {s: a for s, a in per_atom.items() if not len(a) or a[0] is not None}
        return out

    def batches(self, sizes: np.ndarray) -> list[np.ndarray]:
        """Indices of molecules of ``sizes`` atoms, sorted by size and cut into batches of at most
        ``batch_size`` molecules and ``max_atoms`` padded atoms (a larger molecule alone)."""
        order = np.argsort(sizes, kind="stable")
        out, start = [], 0
        for end in range(1, len(order) + 1):
            if end - start > self.batch_size or (end - start) * sizes[order[end - 1]] > self.max_atoms:
                if end - 1 > start:
                    out.append(order[start:end - 1])
                    start = end - 1
        if start < len(order):
            out.append(order[start:])
        return out

    def get_repr(self, smiles: str | Sequence[str], return_atomic_reprs: bool = False, *, modality: str = "2d",
                 conformers: Optional[str] = None, space: Optional[str] = None) -> dict:
        """Molecule (and atom) embeddings of SMILES in one call, as unimol_tools' ``UniMolRepr.get_repr``.

        Returns ``cls_repr`` float32 [n, d] (the ``space`` embedding, by default
        :meth:`default_space`, of each molecule that could be read), ``smiles`` (their canonical
        SMILES), ``index`` (their positions in ``smiles``) and ``rejects`` (:class:`Reject` of the
        others, with their reasons); with ``return_atomic_reprs``, ``atomic_symbol`` (a list of
        element symbols per molecule, in the order of the SMILES as given), ``atomic_reprs`` (a list
        of float32 [n_i, d], the atoms in that order) and ``atomic_space``: ``space`` where the
        network gives it per atom, else the 2D encoder's (``2d``)."""
        space = space or self.default_space(modality)
        names = [space] + (["2d"] if return_atomic_reprs and "2d" in self.spaces(modality) else [])
        molecules, rejects = self.read([smiles] if isinstance(smiles, str) else list(smiles), modality=modality,
                                       conformers=conformers)
        got = self.embed(molecules, modality, names, atoms=return_atomic_reprs)
        out = {"cls_repr": got[space], "smiles": [m.smiles for m in molecules],
               "index": [m.record["index"] for m in molecules], "rejects": rejects}
        if return_atomic_reprs:
            atom_space = next((s for s in names if s in got["atoms"]), None)
            if atom_space is None:
                raise ConfigError(f"{modality} input of {self.path}: no space with a per-atom form among "
                                  f"{', '.join(names)}")
            out.update(atomic_symbol=[symbols(m.record["z"]) for m in molecules], atomic_reprs=got["atoms"][atom_space],
                       atomic_space=atom_space)
        return out

    # -- internals -------------------------------------------------------------------------------
    def _check_spaces(self, modality: str, spaces: Optional[Sequence[str]]) -> list[str]:
        have = self.spaces(modality)
        spaces = [self.default_space(modality)] if spaces is None else list(dict.fromkeys(spaces))
        unknown = [s for s in spaces if s not in have]
        if unknown or not spaces:
            raise ConfigError(f"space {unknown[0] if unknown else '(none)'!r}: {modality} input of {self.path} "
                              f"has the spaces {', '.join(have)}")
        return spaces

    @staticmethod
    def _record(m: Molecule, modality: str, batch_modality: str) -> dict:
        rec = m.record
        missing = [k for k, need in (("atom_feat", batch_modality != "3d"), ("pos", batch_modality != "2d"))
                   if need and k not in rec]
        if missing:
            what = " or ".join({"atom_feat": "bond graph", "pos": "conformer"}[k] for k in missing)
            raise ValueError(f"molecule {m.id!r}: its {rec['modality']} record has no {what} for {modality} input")
        return rec if rec["modality"] == batch_modality else {**rec, "modality": batch_modality}

    def _batch(self, records: list[dict]) -> dict:
        from flexmol.data.collate import collate, move

        cfg = self.model.cfg
        return move(collate(records, cfg.max_spd, cfg.max_path, compact=False), self.device)
