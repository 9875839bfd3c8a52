"""Retrieval as users run it: an index built by ``flexmol retrieve index`` (MOSES's 1.94M for
BENCHMARKS.md), measured through ``Index.load``, ``Index.search`` and ``flexmol retrieve query``.

With ``--build LIBRARY --checkpoint EXPORT``, the index is first built by the CLI, ``flexmol
retrieve index LIBRARY --checkpoint EXPORT --out INDEX`` (plus ``--build-args``), run as a
subprocess under ``/usr/bin/time -v``: its wall time and maximum RSS. Then, on ``--index INDEX``:

1. the index: what ``index.json`` records (molecules, rejects, build time per space and in all,
   kind and parameters), bytes on disk per space and of the library table and fingerprints, and the
   library rows whose canonical SMILES an earlier row has (counted from ``library.parquet``);
2. ``Index.load``: seconds (the first load, which imports what it needs, and a second) and the
   process's RSS after it; then, per space, reading its faiss file
   (what the first search does) and hashing it (sha256: what checking it at every load would add);
   then loading the checkpoint and the first search: seconds, RSS;
3. ``Index.search`` over ``--queries`` library molecules given as SMILES (rows drawn with
   ``--seed``), query embedding included: one SMILES per call (p50/p95), with the ECFP4 Tanimoto
   baseline (as the CLI runs) and without it; then all of them in one call (ms per query);
4. recall@K of each approximate space against exact search: the vectors the index stores
   (reconstructed from its flat storage) in an ``IndexFlatIP``, searched with the query
   molecules embedded as ``Index.search`` embeds them, against the rows ``Index.search`` returned
   in the batch call. Rows of equal similarity (molecules the encoder cannot tell apart) make the
   true top K ambiguous, so recall is also given counting every found row at least as similar as
   the K-th exact one (``recall_ties``); and the share of queries that found their own row;
5. the CLI: ``flexmol retrieve query SMILES --index INDEX --k K --json``, ``--cli-runs`` runs, each
   a new process (start, imports, load, one query): wall time and maximum RSS.

    python benchmarks/retrieval.py --index INDEX [--queries 200] [--k 10] [--cli-runs 3] [--threads N]
    python benchmarks/retrieval.py --build moses --checkpoint EXPORT --index INDEX [--build-args "--limit 20000"]

Results: printed, and written to benchmarks/out/retrieval_<index name>.json (``--out`` to choose).
"""
import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flexmol.tools.retrieve import Index, normalise, recall_at_k, search_vectors

OUT = Path(__file__).resolve().parent / "out"


def rss_mib() -> dict:
    """The process's resident memory now and at its peak, MiB."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mib": round(now, 1), "peak_rss_mib": round(peak, 1)}


def flexmol_command() -> list[str]:
    """The ``flexmol`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "flexmol"
    return [str(script)] if script.is_file() else [shutil.which("flexmol") or "flexmol"]


def timed(command: list[str]) -> dict:
    """Run ``command`` under ``/usr/bin/time -v`` (when the machine has it): return code, wall
    seconds, maximum RSS (MiB), and the last lines of its stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        gnu = Path("/usr/bin/time").is_file()
        full = ["/usr/bin/time", "-v", "-o", report.name, *command] if gnu else command
        started = time.perf_counter()
        done = subprocess.run(full, capture_output=True, text=True)
        wall = time.perf_counter() - started
        rss = None
        for line in (report.read() if gnu else "").splitlines():
            if "Maximum resident set size" in line:
                rss = int(line.rsplit(":", 1)[1]) / 1024
    return {"rc": done.returncode, "wall_seconds": round(wall, 3), "max_rss_mib": rss and round(rss, 1),
            "stderr_tail": done.stderr.strip().splitlines()[-3:], "stdout": done.stdout}


def percentiles(seconds: list[float]) -> dict:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "calls": len(ms)}


def build(args) -> dict:
    command = [*flexmol_command(), "retrieve", "index", args.build, "--checkpoint", args.checkpoint,
               "--out", args.index, "--no-progress", *shlex.split(args.build_args or "")]
    print("building:", shlex.join(command), flush=True)
    got = timed(command)
    if got["rc"] != 0:
        sys.exit(f"the build failed ({got['rc']}): " + "\n".join(got["stderr_tail"]))
    got.pop("stdout")
    print(f"built in {got['wall_seconds']:.1f} s, max RSS {got['max_rss_mib']} MiB", flush=True)
    return {"command": shlex.join(command), **got}


def on_disk(index: Index) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = index.meta
    smiles = pq.read_table(index.path / "library.parquet", columns=["smiles"]).column("smiles")
    return {"molecules": meta["molecules"], "rejects": meta["rejects"],
            "duplicate_rows": len(smiles) - pc.count_distinct(smiles).as_py(),
            "duplicate_rows_recorded": meta.get("duplicate_rows"), "kind": meta["kind"],
            "build_seconds": meta["build_seconds"], "options": meta.get("options"),
            "spaces": {s: {"index": v["index"], "params": v["params"], "dim": v["dim"], "bytes": v["bytes"],
                           "bytes_per_molecule": round(v["bytes"] / meta["molecules"], 1),
                           "build_seconds": v["build_seconds"]} for s, v in meta["spaces"].items()},
            "files_bytes": {name: f["bytes"] for name, f in meta["files"].items()},
            "total_bytes": sum(f.stat().st_size for f in index.path.iterdir() if f.is_file())}


def stored_vectors(vector_index) -> np.ndarray:
    """The (normalised) vectors a faiss index holds, row order kept."""
    import faiss

    if isinstance(vector_index, faiss.IndexIVF):
        vector_index.make_direct_map()
    return vector_index.reconstruct_n(0, vector_index.ntotal)


def recall(index: Index, queries: list[str], rows: np.ndarray, batch_result, k: int) -> dict:
    import faiss

    molecules, rejects = index.embedder.read(queries, modality="2d")
    if rejects:
        sys.exit(f"library molecules not embedded as queries: {[r.to_json() for r in rejects[:3]]}")
    vectors = index.embedder.embed(molecules, "2d", list(index.spaces))
    out = {}
    for space in index.spaces:
        kind = index.meta["spaces"][space]["index"]
        found = np.array([[h.row for h in q.spaces[space]] + [-1] * (k - len(q.spaces[space]))
                          for q in batch_result.results])
        own = float(np.mean([row in f for row, f in zip(rows, found)]))
        if kind == "flat":
            out[space] = {"index": kind, "recall": 1.0, "own_row_found": own}
            continue
        started = time.perf_counter()
        stored = stored_vectors(index.vector_index(space))
        flat = faiss.IndexFlatIP(stored.shape[1])
        flat.add(stored)
        q = normalise(vectors[space])
        sims, truth = search_vectors(flat, q, k)
        exact_s = time.perf_counter() - started
        # a found row is as good as a true one when it is at least as similar as the k-th true one
        found_sims = np.einsum("qd,qkd->qk", q, stored[np.maximum(found, 0)])
        ties = float(np.mean([((fs >= s[-1] - 1e-5) & (f >= 0)).sum() / k
                              for fs, f, s in zip(found_sims, found, sims)]))
        out[space] = {"index": kind, "recall": recall_at_k(found, truth), "recall_ties": ties,
                      "own_row_found": own, "exact_search_seconds": round(exact_s, 2)}
        del flat, stored
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True,
                   help="an index directory (flexmol retrieve index), or where --build puts it")
    p.add_argument("--build", metavar="LIBRARY", help="first build the index of LIBRARY with the CLI")
    p.add_argument("--checkpoint", help="the export --build embeds with")
    p.add_argument("--build-args", help="more flags for flexmol retrieve index, one string (e.g. \"--limit 20000\")")
    p.add_argument("--queries", type=int, default=200, help="library molecules queried as SMILES")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cli-runs", type=int, default=3, help="flexmol retrieve query processes timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="faiss threads (default: faiss's)")
    p.add_argument("--out", help="JSON file (default: benchmarks/out/retrieval_<index name>.json)")
    args = p.parse_args(argv)
    if args.build and not args.checkpoint:
        p.error("--build needs --checkpoint")
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    result = {"index": str(Path(args.index).resolve()), "k": args.k, "seed": args.seed,
              "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_start": os.getloadavg()}}
    if args.build:
        result["build"] = build(args)

    started = time.perf_counter()
    index = Index.load(args.index)
    first = time.perf_counter() - started  # the modules it imports included
    started = time.perf_counter()
    index = Index.load(args.index)
    result["load"] = {"seconds": round(time.perf_counter() - started, 3), "first_seconds": round(first, 3),
                      **rss_mib()}
    result["on_disk"] = on_disk(index)
    d = result["on_disk"]
    kinds = ", ".join(sorted({s["index"] for s in d["spaces"].values()}))
    print(f"index: {d['molecules']:,} molecules, {d['kind']} ({kinds}), "
          f"built in {d['build_seconds']:.1f} s, {d['total_bytes'] / 2**20:.1f} MiB on disk; "
          f"{d['duplicate_rows']:,} duplicate rows; Index.load {result['load']['seconds']:.2f} s "
          f"(first, with imports: {result['load']['first_seconds']:.2f} s), "
          f"RSS {result['load']['rss_mib']:.0f} MiB", flush=True)

    from flexmol.data.registry import sha256_file

    reads = {}
    for space in index.spaces:
        file = index.path / index.meta["spaces"][space]["file"]
        t0 = time.perf_counter()
        index.vector_index(space)
        t1 = time.perf_counter()
        sha256_file(file)
        reads[space] = {"read_seconds": round(t1 - t0, 3), "sha256_seconds": round(time.perf_counter() - t1, 3)}
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(index), min(args.queries, len(index)), replace=False))
    queries = [index.smiles[r] for r in rows]
    index.search(queries[0], args.k)
    first = result["first_search"] = {"faiss_files": reads, **rss_mib(),
                                      "checkpoint_and_search_seconds": round(time.perf_counter() - started, 3)}
    print(f"faiss read {sum(r['read_seconds'] for r in reads.values()):.2f} s, sha256 "
          f"{sum(r['sha256_seconds'] for r in reads.values()):.2f} s; checkpoint + first search "
          f"{first['checkpoint_and_search_seconds']:.2f} s; RSS {first['rss_mib']:.0f} MiB",
          flush=True)

    search = {"queries": len(queries)}
    for name, tanimoto in (("with_tanimoto", True), ("spaces_only", False)):
        seconds = []
        for smi in queries:
            t = time.perf_counter()
            index.search(smi, args.k, tanimoto=tanimoto)
            seconds.append(time.perf_counter() - t)
        search[f"single_{name}"] = percentiles(seconds)
    t = time.perf_counter()
    batch = index.search(queries, args.k)
    search["batch_ms_per_query"] = round(1e3 * (time.perf_counter() - t) / len(queries), 2)
    search.update(rss_mib())
    result["search"] = search
    print(f"Index.search, one SMILES per call: p50 {search['single_with_tanimoto']['p50_ms']:.1f} ms, p95 "
          f"{search['single_with_tanimoto']['p95_ms']:.1f} ms (without Tanimoto: p50 "
          f"{search['single_spaces_only']['p50_ms']:.1f}, p95 {search['single_spaces_only']['p95_ms']:.1f}); "
          f"{len(queries)} in one call: {search['batch_ms_per_query']:.1f} ms per query", flush=True)

    result[f"recall_at_{args.k}"] = recall(index, queries, rows, batch, args.k)
    for space, r in result[f"recall_at_{args.k}"].items():
        print(f"recall@{args.k} {space} ({r['index']}): {r['recall']:.4f}"
              + (f" (ties counted {r['recall_ties']:.4f})" if "recall_ties" in r else "")
              + f"; own row found {r['own_row_found']:.3f}", flush=True)

    cli = [*flexmol_command(), "retrieve", "query", queries[0], "--index", str(index.path), "--k", str(args.k),
           "--json", *(["--threads", str(args.threads)] if args.threads else [])]
    runs = [timed(cli) for _ in range(args.cli_runs)]
    for r in runs:
        if r["rc"] != 0 or not json.loads(r.pop("stdout"))["queries"]:
            sys.exit(f"flexmol retrieve query failed ({r['rc']}): " + "\n".join(r["stderr_tail"]))
    walls = [r["wall_seconds"] for r in runs]
    result["cli_query"] = {"command": shlex.join(cli), "wall_seconds": walls,
                           "median_wall_seconds": float(np.median(walls)),
                           "max_rss_mib": max(r["max_rss_mib"] or 0 for r in runs)}
    print(f"flexmol retrieve query (one SMILES, --json): median {result['cli_query']['median_wall_seconds']:.2f} s "
          f"over {len(runs)} runs, max RSS {result['cli_query']['max_rss_mib']:.0f} MiB", flush=True)

    result["machine"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews latencies
    out = Path(args.out) if args.out else OUT / f"retrieval_{Path(args.index).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
