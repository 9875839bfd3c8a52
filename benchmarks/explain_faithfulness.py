"""Are `flexmol explain`'s atom importances faithful? A task whose label is a substructure: "contains a
carboxylic acid" (RDKit SMARTS), on real molecules (RDKit's NCI first_5K.smi: single fragment, 5-30
heavy atoms), classes balanced. A tiny randomly initialised model is exported, fully fine-tuned on it through
`flexmol finetune`'s own code path (run_finetune, seeded), and loaded back as a saved task model;
then, over held-out molecules that contain the acid (never seen in fine-tuning), the atom-level
ROC-AUC of each method's importance with the acid's atoms (C, =O, O) as positives: per molecule,
then averaged. A faithful method ranks the atoms the label depends on at the top.

A model-free rule already ranks acid atoms high (they are oxygens and a carbon bonded to two), so
two figures say more than the plain AUC:

- ``*_hard_auc``: the same AUC with only the atoms a rule cannot tell from the acid's as negatives
  (oxygens outside the acid and atoms bonded to an oxygen), per molecule that has any;
- ``control_*``: the gradient method on the untrained model (the fine-tuning's starting point, the
  same export with a freshly seeded head): what the attribution gives without the learnt task
  (its direction follows the random head's sign, so it varies by seed);
- ``rule_*``: the rule "oxygens among the atom and its neighbours", model-free.

    .venv/bin/python benchmarks/explain_faithfulness.py --seeds 0 1 2

prints, per seed and as mean ± std over the seeds, the held-out classification ROC-AUC and those
atom-level ROC-AUCs, and writes benchmarks/out/explain_faithfulness.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ACID = "[CX3](=O)[OX2H1,OX1-]"
# The fine-tuned model: a FlexMol of these sizes, randomly initialised (the seed's), every weight
# trained with these settings (early stopping on the validation part, as `flexmol finetune` does).
MODEL = {"dim": 32, "heads": 4, "layers": 2, "decoder_layers": 1, "mm_layers": 1, "ffn_mult": 2, "num_kernels": 8,
         "proj_dim": 16}
TRAIN = {"epochs": 14, "patience": 14, "batch_size": 32, "lr": 2e-3, "warmup_ratio": 0.1}
METRICS = ("held_out_roc_auc", "gradient_atom_auc", "gradient_hard_auc", "attention_atom_auc", "control_atom_auc",
           "control_hard_auc", "rule_atom_auc", "rule_hard_auc", "acid_raises")


def labelled(smi_path: Path, start: int = 0, stop: int | None = None) -> tuple[list[str], list[str]]:
    """(acids, others): SMILES of lines ``start`` to ``stop`` (the end: None) of ``smi_path`` that
    are one fragment of 5-30 heavy atoms RDKit parses, split by whether they contain :data:`ACID`."""
    from rdkit import Chem

    pattern = Chem.MolFromSmarts(ACID)
    acids, others = [], []
    with open(smi_path) as f:
        for k, line in enumerate(f):
            if stop is not None and k >= stop:
                break
            smi = line.split()[0] if k >= start and line.strip() else ""
            mol = Chem.MolFromSmiles(smi) if smi and "." not in smi else None
            if mol is None or not 5 <= mol.GetNumHeavyAtoms() <= 30:
                continue
            (acids if mol.HasSubstructMatch(pattern) else others).append(smi)
    return acids, others


def acid_atoms(mol) -> np.ndarray:
    """[n] bool: the atoms of ``mol`` in a carboxylic acid match."""
    from rdkit import Chem

    mask = np.zeros(mol.GetNumAtoms(), dtype=bool)
    for match in mol.GetSubstructMatches(Chem.MolFromSmarts(ACID)):
        mask[list(match)] = True
    return mask


def look_alike(mol) -> np.ndarray:
    """[n] bool: the atoms a rule cannot tell from an acid's: oxygens and atoms bonded to one."""
    return np.array([a.GetSymbol() == "O" or any(n.GetSymbol() == "O" for n in a.GetNeighbors())
                     for a in mol.GetAtoms()])


def oxygen_rule(mol) -> np.ndarray:
    """[n] the model-free rule: oxygens among the atom and its neighbours."""
    return np.array([(a.GetSymbol() == "O") + sum(n.GetSymbol() == "O" for n in a.GetNeighbors())
                     for a in mol.GetAtoms()], dtype=np.float32)


def per_molecule_auc(scores: list[np.ndarray], masks: list[np.ndarray], keep: list[np.ndarray] | None = None) -> float:
    """Mean over molecules of the ROC-AUC of ``scores`` separating the masked atoms from the others
    (only the atoms ``keep`` marks, where given; molecules without both kinds left out)."""
    from sklearn.metrics import roc_auc_score

    keep = keep or [np.ones(len(m), dtype=bool) for m in masks]
    aucs = [roc_auc_score(m[k], s[k]) for s, m, k in zip(scores, masks, keep) if 0 < m[k].sum() < k.sum()]
    return float(np.mean(aucs)) if aucs else float("nan")


def run_protocol(smi_path: Path, work: Path, seed: int, *, start: int = 0, stop: int | None = None,
                 held_out: float = 0.2, steps: int | None = None, train: dict | None = None, log=print) -> dict:
    """One seed of the protocol (see the module's note) on lines ``start``-``stop`` of ``smi_path``,
    in directory ``work``; ``steps``: integrated-gradients points (flexmol explain's default: None);
    ``train``: settings overriding :data:`TRAIN`. Returns the held-out classification ROC-AUC, the
    atom-level ROC-AUCs of :data:`METRICS` and the sizes."""
    import torch
    from sklearn.metrics import roc_auc_score

    from flexmol import load_pretrained
    from flexmol.finetune.cli import DEFAULT_CONFIG
    from flexmol.finetune.config import load
    from flexmol.finetune.model import build_task_model, load_task_model
    from flexmol.finetune.protocol import run_finetune
    from flexmol.model import FlexMol
    from flexmol.model.export import save_pretrained
    from flexmol.model.network import ModelConfig
    from flexmol.tools.explain import STEPS, explain, parse

    steps = steps or STEPS
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    acids, others = labelled(smi_path, start, stop)
    others = [others[i] for i in rng.permutation(len(others))[:len(acids)]]  # balanced
    rows = [(s, 1) for s in acids] + [(s, 0) for s in others]
    order = rng.permutation(len(rows))
    cut = int(round(held_out * len(rows)))
    test, fit = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "acid.csv"
    csv.write_text("smiles,acid\n" + "".join(f"{s},{y}\n" for s, y in fit))

    torch.manual_seed(seed)
    export = save_pretrained(FlexMol(ModelConfig(**MODEL)), work / "export")
    cfg = load(DEFAULT_CONFIG, {
        "checkpoint": str(export), "data": {"source": str(csv), "targets": ["acid"], "task": "classification",
                                            "num_workers": 0},
        "split": {"kind": "random"}, "seeds": [seed], "lora": {"enabled": False}, "baselines": [],
        "train": {**TRAIN, **(train or {})}, "device": "cpu", "out": str(work / "finetune")})
    result = run_finetune(cfg)
    task_model, meta = load_task_model(work / "finetune" / "runs" / "flexmol" / f"seed{seed}" / "model", export)

    parsed, rejects = parse([s for s, _ in test])
    y = np.array([test[p.index][1] for p in parsed])
    explained = explain(parsed, task_model=task_model, task_meta=meta, methods=("attention", "gradient"),
                        steps=steps)
    prob = np.array([e.prediction["value"] for e in explained])
    positives = [e for e, label in zip(explained, y) if label == 1]
    masks = [acid_atoms(e.mol) for e in positives]
    hard = [look_alike(e.mol) for e in positives]
    # the control: the fine-tuning's starting point (the export) with a freshly seeded head
    torch.manual_seed(seed)
    control = build_task_model(load_pretrained(export), 1, lora=False).eval()
    controlled = explain([p for p, label in zip(parsed, y) if label == 1], task_model=control, task_meta=meta,
                         methods=("gradient",), steps=steps)
    scores = {"gradient": [e.methods["gradient"]["raw_atoms"] for e in positives],
              "attention": [e.methods["attention"]["raw_atoms"] for e in positives],
              "control": [e.methods["gradient"]["raw_atoms"] for e in controlled],
              "rule": [oxygen_rule(e.mol) for e in positives]}
    out = {"seed": seed, "fit_molecules": len(fit), "held_out": len(parsed), "held_out_acids": len(positives),
           "hard_molecules": int(sum(0 < m[k].sum() < k.sum() for m, k in zip(masks, hard))),
           "rejected": len(rejects), "valid_roc_auc": result["models"]["flexmol"]["valid_mean"],
           "held_out_roc_auc": float(roc_auc_score(y, prob))}
    for name, values in scores.items():
        out[f"{name}_atom_auc"] = per_molecule_auc(values, masks)
        if name != "attention":
            out[f"{name}_hard_auc"] = per_molecule_auc(values, masks, hard)
    # acids whose acid atoms raise the prediction on average (the gradient method's sign)
    out["acid_raises"] = float(np.mean([s[m].mean() > 0 for s, m in zip(scores["gradient"], masks)]))
    out["seconds"] = round(time.perf_counter() - began, 1)
    log(f"[seed {seed}] " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def main() -> int:
    from rdkit import RDConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--start", type=int, default=0, help="first line of first_5K.smi read (default: 0)")
    p.add_argument("--stop", type=int, help="line of first_5K.smi where reading stops (default: the end)")
    p.add_argument("--work", default="outputs/bench/explain_faithfulness")
    args = p.parse_args()
    smi = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    runs = [run_protocol(smi, Path(args.work) / f"seed{s}", s, start=args.start, stop=args.stop)
            for s in args.seeds]
    summary = {"lines": [args.start, args.stop], "molecules_fit": runs[0]["fit_molecules"],
               "held_out_acids": [r["held_out_acids"] for r in runs], "seeds": args.seeds,
               "seconds": sum(r["seconds"] for r in runs),
               "per_seed": {k: [round(r[k], 3) for r in runs] for k in METRICS}}
    for key in METRICS:
        v = np.array([r[key] for r in runs])
        summary[key] = f"{v.mean():.3f} ± {v.std():.3f}"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import report

    report("explain_faithfulness", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
