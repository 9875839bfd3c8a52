"""Categorical feature vocabularies of the 2D record (schema version 1).

The atom and bond features are the ones METHOD.md lists, in the OGB / PyTorch Geometric
convention. Enumerations take RDKit's own integer values (chirality, hybridisation, bond type and
stereo), so no lookup table sits on the hot path; counts are clipped into their last bucket
("that many or more"). A vocabulary change is a schema change: bump ``SCHEMA_VERSION``.
"""

# (name, number of classes). Column order of ``atom_feat`` / ``bond_feat`` in a record.
ATOM_FEATURES = (
    ("atomic_num", 119),  # 0..118, the atomic number itself
    ("chirality", 9),  # rdkit.Chem.ChiralType
    ("degree", 11),  # total degree including hydrogens, 0..10
    ("formal_charge", 12),  # charge + FORMAL_CHARGE_OFFSET, charges -5..+6
    ("num_hs", 9),  # total hydrogens, 0..8
    ("num_radical_electrons", 5),  # 0..4
    ("hybridization", 9),  # rdkit.Chem.HybridizationType
    ("is_aromatic", 2),
    ("is_in_ring", 2),
)
BOND_FEATURES = (
    ("bond_type", 22),  # rdkit.Chem.BondType
    ("stereo", 8),  # rdkit.Chem.BondStereo
    ("is_conjugated", 2),
)
FORMAL_CHARGE_OFFSET = 5
ATOM_FEATURE_SIZES = tuple(n for _, n in ATOM_FEATURES)
BOND_FEATURE_SIZES = tuple(n for _, n in BOND_FEATURES)
