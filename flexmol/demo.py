"""The main job on the default data: what ``flexmol demo`` runs, end to end on one CPU machine.

1. featurise a QM9 subset as paired 2D+3D data (DFT geometries) and a MOSES subset as 2D-only
   data, both through the Ray job, and check both datasets;
2. pre-train the tiny model: stage 1 on the paired data, stage 2 from it on MOSES 2D mixed with
   the paired data, each validated on held-out shards and ending with the alignment report;
3. fine-tune on B3DB (blood-brain barrier, classification) with the scaffold split and 3 seeds:
   LoRA and full fine-tuning of the pre-trained model, the same model trained from scratch,
   linear probes on the frozen embeddings of the pre-trained and the random-initialised model,
   and ECFP4 + random forest, all on the same splits; print the table;
4. score conformation generation on held-out QM9 molecules against RDKit ETKDG.

Every step writes under ``--out``; a rerun finds finished featurisations, checkpoints and
fine-tuning runs and goes on from there.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flexmol import config
from flexmol.data.shards import inspect
from flexmol.featurize import FeaturizeError, run_featurize


def _arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DemoConfig:
    """The main job on the default data, end to end on one machine: featurise a QM9 subset (paired 2D+3D)
    and a MOSES subset (2D) through the Ray job; pre-train the tiny model, stage 1 then stage 2 from it;
    fine-tune on B3DB with the scaffold split (LoRA, full fine-tuning, scratch, linear probes, ECFP4 + RF);
    score conformation generation on held-out QM9 molecules. A rerun goes on from what is finished."""

    out: str = _arg("outputs/demo", "directory for everything the job writes")
    qm9_limit: int = _arg(2000, "QM9 molecules featurised as paired 2D+3D pre-training data")
    moses_limit: int = _arg(20000, "MOSES molecules featurised as 2D-only pre-training data")
    stage1_steps: int = _arg(150, "optimizer steps of stage 1")
    stage2_steps: int = _arg(150, "optimizer steps of stage 2")
    # a seeded random subset of B3DB (the file is sorted by class)
    b3db_sample: int = _arg(1000, "B3DB molecules fine-tuned on (a seeded random subset)")
    epochs: int = _arg(6, "fine-tuning epochs")
    seeds: int = _arg(3, "fine-tuning seeds (splits and initialisations)")
    # the tiny model is 64 wide: rank 64 would be full rank
    lora_r: int = _arg(16, "LoRA rank")
    confgen_count: int = _arg(50, "held-out QM9 molecules for conformation generation")

    def problems(self) -> list[str]:
        """What is wrong with these values, one sentence each (empty when they can run)."""
        least = {"qm9_limit": 40, "moses_limit": 40, "stage1_steps": 1, "stage2_steps": 1, "b3db_sample": 100,
                 "epochs": 1, "seeds": 1, "lora_r": 1, "confgen_count": 1}
        found = [f"--{k.replace('_', '-')} must be at least {v} (got {getattr(self, k)})"
                 for k, v in least.items() if getattr(self, k) < v]
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            found.append(f"--out {out}: exists and is not a directory")
        return found


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _featurize(out: Path, cfg: DemoConfig) -> list:
    # Shards small enough that every core gets work, and at least four per dataset: pre-training
    # streams each dataset through two loader workers.
    steps = [
        ("qm9", "paired", cfg.qm9_limit, out / "shards" / "qm9_paired", min(250, max(1, cfg.qm9_limit // 4))),
        ("moses", "2d", cfg.moses_limit, out / "shards" / "moses_2d", min(2500, max(1, cfg.moses_limit // 4))),
    ]
    reports = []
    for source, modality, limit, directory, shard_size in steps:
        _banner(f"featurise {source} ({modality}, first {limit} molecules) -> {directory}")
        fcfg = config.build(config.FeaturizeConfig, {"source": source, "modality": modality, "limit": limit,
                                                     "out": str(directory), "job": {"shard_size": shard_size}})
        run_featurize(fcfg)
        reports.append(inspect(directory))
    return reports


def pretrain_stages(out: Path, cfg: DemoConfig) -> list[tuple[str, Path, list[str]]]:
    """The main job's two pre-training runs: (stage config, output directory, overrides)."""
    paired, single = out / "shards" / "qm9_paired", out / "shards" / "moses_2d"
    common = ["model.size=tiny", "wandb.mode=disabled", "resume=auto", "train.log_every=25"]
    ramp = (f"data.mix=[{{step: 0, weights: {{paired: 1.0, single_2d: 0.0}}}}, "
            f"{{step: {cfg.stage2_steps // 3}, weights: {{paired: 0.3, single_2d: 0.7}}}}]")
    stages = [
        ("stage1.yaml", out / "stage1", [f"data.paired=[{paired}]", f"train.max_steps={cfg.stage1_steps}",
                                         f"train.warmup_steps={max(1, cfg.stage1_steps // 10)}", "train.lr=3e-4",
                                         f"train.save_every={cfg.stage1_steps}"]),
        ("stage2.yaml", out / "stage2", [f"data.paired=[{paired}]", f"data.single_2d=[{single}]",
                                         f"init_from={out / 'stage1'}", f"train.max_steps={cfg.stage2_steps}",
                                         f"train.warmup_steps={max(1, cfg.stage2_steps // 10)}", "train.lr=1e-4",
                                         f"train.save_every={cfg.stage2_steps}", ramp]),
    ]
    return [(name, directory, common + [f"output_dir={directory}"] + overrides) for name, directory, overrides in stages]


def _pretrain(out: Path, cfg: DemoConfig) -> Path:
    from flexmol.train.config import load
    from flexmol.train.trainer import Pretrainer

    for name, directory, overrides in pretrain_stages(out, cfg):
        _banner(f"pre-train {name.split('.')[0]} (tiny model, CPU) -> {directory}")
        pcfg = load(config.PACKAGE_CONFIGS / "pretrain" / name, overrides)
        Pretrainer(pcfg).run()  # a finished stage says so and does nothing
    return out / "stage2" / "export"


def _finetune(out: Path, cfg: DemoConfig, checkpoint: Path) -> dict:
    from flexmol.finetune.cli import DEFAULT_CONFIG
    from flexmol.finetune.config import load
    from flexmol.finetune.protocol import run_finetune, table

    _banner(f"fine-tune on B3DB ({cfg.b3db_sample} molecules, scaffold split, {cfg.seeds} seeds): the pre-trained "
            "model with LoRA and fully fine-tuned vs the same architecture from scratch; linear probes on the "
            "frozen embeddings of both (pre-trained, random initialisation); ECFP4 + RF")
    fcfg = load(DEFAULT_CONFIG, {"checkpoint": str(checkpoint), "out": str(out / "finetune_b3db"),
                                 "seeds": list(range(cfg.seeds)),
                                 "baselines": ["flexmol_full", "scratch", "probe_flexmol", "probe_scratch", "ecfp_rf"],
                                 "data": {"source": "b3db", "targets": ["bbb"], "task": "classification",
                                          "subsample": cfg.b3db_sample},
                                 "lora": {"r": cfg.lora_r, "alpha": 2 * cfg.lora_r},
                                 "train": {"epochs": cfg.epochs, "patience": cfg.epochs, "lr": 1e-3},
                                 "rf": {"n_estimators": 200}})
    results = run_finetune(fcfg)
    print(table(results))
    return results


def _confgen(out: Path, cfg: DemoConfig, checkpoint: Path) -> dict:
    import json

    from flexmol import load_pretrained
    from flexmol.evaluate.confgen import ConfgenConfig, evaluate_qm9

    _banner(f"conformation generation: {cfg.confgen_count} held-out QM9 molecules, ETKDG vs FlexMol refinement")
    res = evaluate_qm9(ConfgenConfig(), load_pretrained(checkpoint), count=cfg.confgen_count,
                       exclude=[out / "shards" / "qm9_paired", out / "shards" / "moses_2d"])  # all pre-training data
    (out / "confgen").mkdir(parents=True, exist_ok=True)
    (out / "confgen" / "confgen.json").write_text(json.dumps(res, indent=1) + "\n")
    for name, s in res["scores"].items():
        print(f"{name:<8} COV {s['cov_mean']:.3f}  MAT {s['mat_mean']:.3f} A  ({s['molecules']} molecules)")
    return res


def run_demo(cfg: DemoConfig) -> int:
    problems = cfg.problems()
    if problems:
        print(f"flexmol demo: {problems[0]}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    start = time.perf_counter()
    try:
        reports = _featurize(out, cfg)
    except FeaturizeError as exc:
        print(f"flexmol demo: {exc}")
        return 2
    print()
    for r in reports:
        print(r.summary())
    if not all(r.ok for r in reports):
        return 1
    checkpoint = _pretrain(out, cfg)
    results = _finetune(out, cfg, checkpoint)
    conf = _confgen(out, cfg, checkpoint)
    _banner(f"done in {time.perf_counter() - start:.0f} s; everything is under {out}")
    ft = results["models"]
    print(f"B3DB ROC-AUC (scaffold split, {cfg.seeds} seeds): "
          + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in ft.items()))
    print("QM9 conformers: " + ", ".join(f"{k} COV {v['cov_mean']:.2f} MAT {v['mat_mean']:.3f} A"
                                          for k, v in conf["scores"].items()))
    return 0
