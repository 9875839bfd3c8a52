import os
from pathlib import Path

import pytest
from rdkit import RDConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra):
    """This process's environment without the rendezvous variables an in-process run set."""
    return {**{k: v for k, v in os.environ.items() if k not in _DIST_VARS}, "DS_ACCELERATOR": "cpu", **extra}
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def nci_smi() -> Path:
    """4,999 real NCI molecules shipped with RDKit (salts, metals and all)."""
    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


@pytest.fixture(scope="session")
def egfr_sdf() -> Path:
    """365 EGFR ligands with 3D coordinates, shipped with RDKit."""
    return Path(RDConfig.RDContribDir) / "PBF" / "testData" / "egfr.sdf"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from flexmol.data.registry import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="session")
def qm9_rows(data_dir):
    """The first 400 QM9 rows (DFT geometries), from the qm9pack wheel; skipped if pip cannot fetch it."""
    import itertools

    from flexmol.data.registry import DatasetUnavailable
    from flexmol.data.sources import open_source

    try:
        src = open_source("qm9", data_dir=data_dir)
    except DatasetUnavailable as exc:
        pytest.skip(f"QM9 wheel unavailable: {exc}")
    return list(itertools.islice(src, 400))


def nci_molecules(nci_smi, n):
    """The first ``n`` single-fragment NCI molecules of 5-30 heavy atoms that RDKit parses, as
    (SMILES, RDKit molecule)."""
    from rdkit import Chem

    out = []
    for line in open(nci_smi):
        smi = line.split()[0]
        mol = Chem.MolFromSmiles(smi)
        if mol is not None and "." not in smi and 5 <= mol.GetNumHeavyAtoms() <= 30:
            out.append((smi, mol))
        if len(out) == n:
            break
    return out


def nci_2d_dataset(directory: Path, nci_smi: Path, limit: int) -> Path:
    """The first ``limit`` NCI inputs featurised as 2D, in shards of 50, in-process."""
    from flexmol import config
    from flexmol.featurize import run_featurize

    out = directory / "nci2d"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": str(nci_smi), "out": str(out), "modality": "2d", "limit": limit,
        "job": {"executor": "serial", "shard_size": 50, "progress": False}}), log=lambda m: None)
    return out
