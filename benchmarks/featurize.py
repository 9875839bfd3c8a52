"""Featurisation benchmark: FlexMol's featuriser and Ray job against a plain RDKit loop.

On the same real drug-like molecules (the first N of the MOSES test set):
  (a) plain RDKit, one process: ETKDG + MMFF per molecule as unimol_tools does it;
  (b) FlexMol's featuriser, one process: parse, standardise, InChIKey, ETKDGv3 + MMFF94,
      graph features, msgpack, shard write (the Ray task's body, in-process);
  (c) the Ray job on all cores, timed with Ray already up and, separately, including start-up;
  (d) the plain loop of (a) on all cores with multiprocessing: the machine's own parallel ceiling.
Also: 2D-only molecules/s on one core; the training loader (what `flexmol shards bench` runs) on 0 and 2 workers.

    .venv/bin/python benchmarks/featurize.py [--n 1000] [--n2d 20000]

Prints a table and writes benchmarks/out/featurize.json.

With --moses-2d, only this: the first N MOSES molecules (or all 1.94M with ``full``) built as 2D
shards by the Ray job on this machine's cores, as ``flexmol featurize moses --modality 2d`` builds
them, with the driver's resident memory sampled every second (the driver alone: Ray's own
processes and workers are other processes) and its peak from getrusage; written to
benchmarks/out/featurize_moses2d_N.json.

    .venv/bin/python benchmarks/featurize.py --moses-2d 200000
    .venv/bin/python benchmarks/featurize.py --moses-2d full
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from rdkit import Chem, RDLogger  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from _report import report  # noqa: E402
from flexmol import config  # noqa: E402
from flexmol.data.sources import open_source  # noqa: E402
from flexmol.featurize import run_featurize  # noqa: E402
from flexmol.featurize.task import ShardSpec, featurize_shard, parts_dir  # noqa: E402

RDLogger.DisableLog("rdApp.*")


def moses_test(n: int, offset: int = 0) -> list:
    """Inputs from the MOSES test split (index 1,584,663 onwards in the named set's order)."""
    src = open_source("moses")
    it = (r for r in src if r.id.startswith("moses-test-"))
    return list(itertools.islice(it, offset, offset + n))


def unimol_tools_loop(smiles: list[str], seed: int = 42) -> int:
    """unimol_tools' inner_smi2coords, reduced to its RDKit calls: AddHs, EmbedMolecule (ETKDG),
    MMFFOptimizeMolecule, random-coordinate retry, coordinates out."""
    done = 0
    for smi in smiles:
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        res = AllChem.EmbedMolecule(mol, randomSeed=seed)
        if res == 0:
            try:
                AllChem.MMFFOptimizeMolecule(mol)
            except Exception:
                pass
        else:
            res = AllChem.EmbedMolecule(mol, maxAttempts=5000, randomSeed=seed, useRandomCoords=True)
            if res == 0:
                try:
                    AllChem.MMFFOptimizeMolecule(mol)
                except Exception:
                    pass
        if res == 0:
            mol.GetConformer().GetPositions()
            done += 1
    return done


def pool_loop(smiles: list[str], cores: int) -> float:
    """(d) the plain RDKit loop split over ``cores`` processes (multiprocessing, no framework): what
    this machine's cores give when run side by side; seconds."""
    import multiprocessing as mp

    chunks = [smiles[i::cores * 4] for i in range(cores * 4)]
    with mp.get_context("fork").Pool(cores) as pool:
        t = time.perf_counter()
        done = sum(pool.map(unimol_tools_loop, chunks))
        dt = time.perf_counter() - t
    assert done > 0.95 * len(smiles)
    return dt


def task_seconds(out: Path) -> float:
    """Seconds the Ray tasks spent featurising (from the shard summaries)."""
    return sum(json.loads(p.read_text())["seconds"] for p in parts_dir(out).glob("*.json"))


def in_process(inputs, modality: str, workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir))
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    cfg = config.FeaturizerConfig()
    t = time.perf_counter()
    s = featurize_shard(ShardSpec(0, inputs[0].index, len(inputs)), inputs, cfg, modality, str(out))
    dt = time.perf_counter() - t
    assert s["samples"] + s["rejected"] == len(inputs)
    return dt


def ray_job(smi_file: Path, n: int, out: Path, shard_size: int, modality: str = "paired", warm: bool = True) -> float:
    import ray

    cfg = config.build(config.FeaturizeConfig, {"source": str(smi_file), "out": str(out), "modality": modality,
                                                "job": {"shard_size": shard_size, "progress": False}})
    if warm and not ray.is_initialized():
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
                 _temp_dir=os.path.join(tempfile.gettempdir(), "flexmol-ray"))
    t = time.perf_counter()
    m = run_featurize(cfg, log=lambda s: None)
    dt = time.perf_counter() - t
    assert m["counts"]["input"] == n
    return dt


def read_throughput(directory: Path, workers: int, seconds: float = 10.0) -> tuple[float, float]:
    """Molecules/s of the stream pre-training reads (:class:`~flexmol.data.streams.SourceStream`
    with the training defaults, through :func:`flexmol.data.loader.measure`, as ``flexmol shards
    bench`` runs it), and the seconds to its first batch."""
    from flexmol.data.loader import measure
    from flexmol.data.streams import SourceStream, dataset_urls
    from flexmol.train.config import DataSection

    d = DataSection()
    stream = SourceStream("single_2d", dataset_urls([str(directory)]), max_atoms=d.max_atoms, seed=0,
                          shuffle_buffer=d.shuffle_buffer, num_workers=workers)
    t = measure(stream, seconds, warmup=2.0)
    return t.molecules_per_s, t.first_batch_s


def _rss_mib() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def moses_2d_driver(limit: int | None, out: Path) -> dict:
    """Build MOSES 2D (the first ``limit`` molecules, or all) with the Ray job; the driver's
    memory: sampled every second, its getrusage peak, and what it was before the job started."""
    cfg = config.build(config.FeaturizeConfig, {"source": "moses", "out": str(out), "modality": "2d", "limit": limit,
                                                "job": {"progress": False}})
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(1.0):
            samples.append((time.perf_counter() - t0, _rss_mib()))

    before = _rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    try:
        m = run_featurize(cfg)
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - t
    rss = [r for _, r in samples] or [before]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "limit": limit, "wall_s": round(wall, 1), "mol_per_s": round(m["counts"]["input"] / wall, 1),
        "counts": m["counts"], "rejects_by_reason": m["rejects_by_reason"], "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
        "driver_rss_before_job_mib": round(before, 1),
        "driver_rss_sampled_max_mib": round(max(rss), 1),
        "driver_rss_sampled_min_mib": round(min(rss), 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        # every 10th sample: (seconds into the job, MiB)
        "driver_rss_every_10s": [(round(s, 0), round(r, 1)) for s, r in samples[::10]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="molecules for the 3D comparison")
    ap.add_argument("--n2d", type=int, default=20000, help="molecules for 2D-only and shard reading")
    ap.add_argument("--moses-2d", metavar="N|full",
                    help="only build MOSES 2D (N molecules, or all) with the Ray job and report the driver's memory")
    ap.add_argument("--out", type=Path, help="with --moses-2d: keep the dataset here (default: a temporary directory)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of (a) and (b)")
    ap.add_argument("--skip-3d", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="flexmol-bench-"))
    if args.moses_2d:
        limit = None if args.moses_2d == "full" else int(args.moses_2d)
        try:
            res = moses_2d_driver(limit, args.out or work / "moses2d")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report(f"featurize_moses2d_{args.moses_2d}", res)
        return
    res: dict = {"machine": f"{platform.machine()}, {cores} cores, {platform.python_version()}", "n": args.n}
    try:
        inputs = moses_test(args.n)
        smiles = [r.text for r in inputs]
        smi_file = work / "mols.smi"
        smi_file.write_text("".join(f"{r.text} {r.id}\n" for r in inputs))
        if not args.skip_3d:
            # (a) and (b) alternate, `--repeats` times each, so that drifts of this shared
            # machine's speed hit both alike; the mean of each is reported.
            a_runs, b_runs = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                unimol_tools_loop(smiles)
                a_runs.append(args.n / (time.perf_counter() - t))
                b_runs.append(args.n / in_process(inputs, "paired", work))
            res["a_runs"], res["b_runs"] = a_runs, b_runs
            res["a_rdkit_loop_mol_s"] = sum(a_runs) / len(a_runs)
            res["b_featurizer_mol_s"] = sum(b_runs) / len(b_runs)
            res["b_over_a"] = res["b_featurizer_mol_s"] / res["a_rdkit_loop_mol_s"]
            # Shards small enough that every core stays busy to the end (4 tasks per core).
            shard = max(1, args.n // (4 * cores))
            wall = ray_job(smi_file, args.n, work / "ray", shard)
            res["c_ray_job_mol_s"] = args.n / wall
            res["c_parallel_efficiency"] = res["c_ray_job_mol_s"] / (cores * res["a_rdkit_loop_mol_s"])
            # Where efficiency goes: the share of wall x cores that tasks were busy (the job's own
            # overhead), and how fast a worker featurised next to the others (the machine).
            busy = task_seconds(work / "ray")
            res["c_busy_share"] = busy / (cores * wall)
            res["c_worker_mol_s"] = args.n / busy
            res["d_pool_loop_mol_s"] = args.n / pool_loop(smiles, cores)
            res["d_pool_efficiency"] = res["d_pool_loop_mol_s"] / (cores * res["a_rdkit_loop_mol_s"])
            res["c_over_d"] = res["c_ray_job_mol_s"] / res["d_pool_loop_mol_s"]
            import ray
            ray.shutdown()
            res["c_ray_job_with_startup_mol_s"] = args.n / ray_job(smi_file, args.n, work / "ray-cold", shard, warm=False)

        inputs2d = moses_test(args.n2d, offset=0)
        res["n2d"] = args.n2d
        res["twod_one_core_mol_s"] = args.n2d / in_process(inputs2d, "2d", work)
        smi2d = work / "mols2d.smi"
        smi2d.write_text("".join(f"{r.text} {r.id}\n" for r in inputs2d))
        shards2d = work / "ray2d"
        res["twod_ray_job_mol_s"] = args.n2d / ray_job(smi2d, args.n2d, shards2d, max(1, args.n2d // 8), "2d", warm=False)
        for w in (0, 2):  # the training loader, as `flexmol shards bench` measures it
            res[f"read_{w}_workers_mol_s"], res[f"read_{w}_workers_first_batch_s"] = read_throughput(shards2d, w)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report("featurize", res)


if __name__ == "__main__":
    sys.exit(main())
