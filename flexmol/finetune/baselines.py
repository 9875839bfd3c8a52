"""ECFP4 + random forest (scikit-learn) on the same splits: the classical baseline of the table."""
from __future__ import annotations

import time

import numpy as np
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from flexmol.evaluate.metrics import score
from flexmol.finetune.split import Split


def ecfp(smiles: list[str], radius: int = 2, bits: int = 2048) -> np.ndarray:
    """Morgan fingerprints (radius 2 = ECFP4) as a uint8 matrix [n, bits]."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = np.zeros((len(smiles), bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:  # the records' canonical SMILES always parse; kept as a guard
            raise ValueError(f"SMILES does not parse: {s!r}")
        DataStructs.ConvertToNumpyArray(gen.GetFingerprint(mol), out[i])
    return out


def random_forest_seed(x: np.ndarray, y: np.ndarray, split: Split, seed: int, task: str, metric: str, rf) -> dict:
    """One forest per task, fitted on the training molecules that have that task's label."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    start = time.perf_counter()
    preds = {part: np.zeros((len(getattr(split, part)), y.shape[1])) for part in ("valid", "test")}
    for t in range(y.shape[1]):
        rows = split.train[~np.isnan(y[split.train, t])]
        if task == "classification":
            classes = np.unique(y[rows, t])
            if len(classes) < 2:  # a task with one class in train: predict its prior
                for part in preds:
                    preds[part][:, t] = classes[0] if len(classes) else 0.5
                continue
            model = RandomForestClassifier(rf.n_estimators, random_state=seed, n_jobs=rf.n_jobs)
            model.fit(x[rows], y[rows, t].astype(int))
            for part in preds:
                preds[part][:, t] = model.predict_proba(x[getattr(split, part)])[:, 1]
        else:
            model = RandomForestRegressor(rf.n_estimators, random_state=seed, n_jobs=rf.n_jobs)
            model.fit(x[rows], y[rows, t])
            for part in preds:
                preds[part][:, t] = model.predict(x[getattr(split, part)])
    return {"seed": seed, "valid": score(metric, y[split.valid], preds["valid"]),
            "test": score(metric, y[split.test], preds["test"]), "seconds": round(time.perf_counter() - start, 1),
            "_test_pred": preds["test"]}
