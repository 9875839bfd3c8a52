"""The sample schema: one molecule as a msgpack record. No pickle, ever.

Schema version 1, one record per molecule:

| field | type | present for | meaning |
|---|---|---|---|
| ``v`` | int | all | schema version |
| ``index`` | int | all | 0-based position of the molecule in its source |
| ``id`` | str | all | the source's identifier (or the index) |
| ``smiles`` | str | all | canonical isomeric SMILES (RDKit) of the featurised molecule |
| ``inchikey`` | str | all | InChIKey; the dataset has no two records with the same one |
| ``modality`` | str | all | ``paired``, ``2d`` or ``3d`` |
| ``z`` | uint8 [n] | all | atomic numbers of the n nodes |
| ``atom_feat`` | uint8 [n, 9] | paired, 2d | categorical atom features, :mod:`flexmol.chem.vocab` |
| ``bond_index`` | uint16 [E, 2] | paired, 2d | atom pairs of the bonds, each bond once, begin < end |
| ``bond_feat`` | uint8 [E, 3] | paired, 2d | categorical bond features |
| ``dist`` | uint8 [n, n] | optional, paired, 2d | bonds on a shortest path from atom i to atom j; 255 where there is none (:mod:`flexmol.chem.pairs`) |
| ``path_bond`` | uint8 [n, n] | with ``dist`` | the bond that ends a shortest path from i at j (a row of ``bond_index``); E where there is none |
| ``pos`` | float32 [K, n, 3] | paired, 3d | K conformers, Å |
| ``conf_method`` | str | paired, 3d | ``etkdg+mmff``, ``etkdg`` or ``input`` (geometry given by the source) |
| ``energy`` | float32 [K] | optional | MMFF94 energy of each conformer, kcal/mol |
| ``labels`` | map str -> number/None | optional | the source's label columns |
| ``fragments_stripped`` | bool | optional | the input was a salt/mixture; the largest fragment was kept |

Arrays are msgpack extension type 1: ``[dtype, shape, raw bytes]`` with dtype from a fixed list.

``dist`` and ``path_bond`` (the 2D pair inputs, stored by the featuriser for molecules of up to
128 atoms) joined version 1 as optional fields: a reader that predates them ignores them, and
a record without them has its tables computed while batching (:mod:`flexmol.data.collate`).
Datasets written before and after read alike; with nothing to refuse, there is no new version.
:func:`validate` checks their types, shapes and ranges; that each path bond ends one step
closer along the bonds is checked when a batch is made; and
:func:`flexmol.chem.pairs.table_problem` checks all of their meaning, a record at a time.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
SAMPLE_EXTENSION = "msgpack"  # the WebDataset member name: "<key>.msgpack"
_ND_EXT = 1
_DTYPES = {np.dtype(t).str: np.dtype(t) for t in
           ("u1", "i1", "u2", "i2", "u4", "i4", "i8", "f2", "f4", "f8", "?")}

REQUIRED = {
    "paired": ("z", "atom_feat", "bond_index", "bond_feat", "pos"),
    "2d": ("z", "atom_feat", "bond_index", "bond_feat"),
    "3d": ("z", "pos"),
}


_ARRAYS = {"z": 1, "atom_feat": 2, "bond_index": 2, "bond_feat": 2, "pos": 3, "energy": 1, "dist": 2, "path_bond": 2}


class SchemaError(ValueError):
    """A record that does not follow the schema (corrupt or foreign data)."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        dt = obj.dtype.str
        if dt not in _DTYPES:
            raise TypeError(f"array dtype {obj.dtype} is not allowed in records")
        return msgpack.ExtType(_ND_EXT, msgpack.packb([dt, list(obj.shape), np.ascontiguousarray(obj).tobytes()]))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} in a record")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ND_EXT:
        raise SchemaError(f"unknown msgpack extension type {code}")
    dt, shape, raw = msgpack.unpackb(data)
    if dt not in _DTYPES:
        raise SchemaError(f"array dtype {dt!r} is not allowed in records")
    try:
        return np.frombuffer(raw, dtype=_DTYPES[dt]).reshape(shape)
    except (ValueError, TypeError):
        raise SchemaError(f"array data does not fit shape {shape}") from None


def encode(record: dict) -> bytes:
    return msgpack.packb(record, default=_default, use_bin_type=True)


def decode(data: bytes) -> dict:
    """Bytes -> record. Arrays come back as read-only views of ``data`` (no copy)."""
    try:
        rec = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(f"not a msgpack record: {exc}") from None
    if not isinstance(rec, dict):
        raise SchemaError("a record must be a map")
    return rec


def validate(rec: dict) -> None:
    """Raise :class:`SchemaError` unless ``rec`` is a well-formed version-1 record."""
    if rec.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"schema version {rec.get('v')!r}, expected {SCHEMA_VERSION}")
    modality = rec.get("modality")
    if modality not in REQUIRED:
        raise SchemaError(f"unknown modality {modality!r}")
    missing = [k for k in ("index", "id", "smiles", "inchikey") + REQUIRED[modality] if k not in rec]
    if missing:
        raise SchemaError(f"{modality} record lacks {', '.join(missing)}")
    # Types first: a foreign or forged record must fail here, with its field named, not as an
    # AttributeError in the checks below or in a training worker.
    if type(rec["index"]) is not int or rec["index"] < 0:
        raise SchemaError(f"index {rec['index']!r} is not a non-negative integer")
    for key in ("id", "smiles", "inchikey", "conf_method"):
        if key in rec and not isinstance(rec[key], str):
            raise SchemaError(f"{key} is a {type(rec[key]).__name__}, not a string")
    for key, ndim in _ARRAYS.items():
        if key in rec and not (isinstance(rec[key], np.ndarray) and rec[key].ndim == ndim):
            raise SchemaError(f"{key} is not a {ndim}-d array")
    if "labels" in rec and not isinstance(rec["labels"], dict):
        raise SchemaError("labels is not a map")
    n = len(rec["z"])
    if "atom_feat" in rec:
        if rec["atom_feat"].shape != (n, 9):
            raise SchemaError(f"atom_feat shape {rec['atom_feat'].shape} for {n} atoms")
        if "bond_index" not in rec or "bond_feat" not in rec:
            raise SchemaError("atom_feat without bond_index and bond_feat")
        bi = rec["bond_index"]
        if bi.ndim != 2 or bi.shape[1] != 2 or rec["bond_feat"].shape != (len(bi), 3):
            raise SchemaError("bond_index / bond_feat shapes disagree")
        if len(bi) and (int(bi.max()) >= n or (bi.dtype.kind != "u" and int(bi.min()) < 0)):
            raise SchemaError("bond_index refers to an atom that does not exist")
    if "dist" in rec or "path_bond" in rec:
        _validate_pair_tables(rec, n)
    if "pos" in rec:
        pos = rec["pos"]
        if pos.ndim != 3 or pos.shape[1:] != (n, 3) or pos.shape[0] < 1:
            raise SchemaError(f"pos shape {pos.shape} for {n} atoms")


def _validate_pair_tables(rec: dict, n: int) -> None:
    if "dist" not in rec or "path_bond" not in rec or "bond_index" not in rec:
        raise SchemaError("dist and path_bond come together, in a record with bond_index")
    dist, path_bond = rec["dist"], rec["path_bond"]
    if dist.dtype != np.uint8 or dist.shape != (n, n):
        raise SchemaError(f"dist is {dist.dtype} {dist.shape}, not uint8 ({n}, {n})")
    if path_bond.dtype != np.uint8 or path_bond.shape != (n, n):
        raise SchemaError(f"path_bond is {path_bond.dtype} {path_bond.shape}, not uint8 ({n}, {n})")
    if n and int(path_bond.max()) > len(rec["bond_index"]):
        raise SchemaError(f"path_bond refers to a bond that does not exist ({len(rec['bond_index'])} bonds)")
