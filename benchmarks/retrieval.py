"""Retrieval over a library (MOSES's 1.94M by default): what ``flexmol retrieve`` costs at scale.

Measured, in this order:

1. reading the library (featurising SMILES, or reading a featurised dataset directory as stored)
   and embedding it with the checkpoint as 2D input, in every space it gives (molecules/s), and its
   ECFP4 fingerprints; or, with ``--embeddings DIR``, the ``<space>.npy`` arrays (and ``ecfp4.npy``)
   an earlier run saved with ``--save-embeddings DIR``;
2. per space, the exact index (``IndexFlatIP``) and each approximate one (``--approx``, the
   parameters of ``flexmol retrieve index``): build time, index bytes (serialised);
3. query latency over ``--queries`` query vectors (library rows drawn with ``--seed``): one query
   per call (p50/p95) and all in one batch (per query), for every index; recall@K of each
   approximate index against exact search on the same queries; exact ECFP4 Tanimoto latency per
   query over ``--tanimoto-queries`` of them;
4. the process's peak RSS after each stage, and the faiss thread count.

    python benchmarks/retrieval.py --checkpoint EXPORT [--library moses|FILE|DATASET_DIR] [--limit N]
        [--save-embeddings DIR | --embeddings DIR] [--spaces fused ...] [--approx hnsw ivf]
        [--queries 1000] [--k 10] [--device cpu] [--threads N]

Results: printed, and written to benchmarks/out/retrieval_<library>_<N>.json (``--out`` to choose).
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from flexmol.tools import fingerprints
from flexmol.tools.retrieve import (APPROX, MODALITY, IndexOptions, build_vector_index, normalise, recall_at_k,
                                    search_vectors)

OUT = Path(__file__).resolve().parent / "out"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed_library(args) -> tuple[dict, np.ndarray, dict]:
    """{space: normalised float32 [N, d]}, packed ECFP4 [N, 256] and the stage's figures."""
    from flexmol.tools import Embedder, iter_molecules

    embedder = Embedder(args.checkpoint, device=args.device, batch_size=args.batch_size, workers=args.workers)
    spaces = args.spaces or list(embedder.spaces(MODALITY))
    chunks = {s: [] for s in spaces}
    fps, read_s, embed_s, fp_s, n, rejected = [], 0.0, 0.0, 0.0, 0, 0
    started = time.perf_counter()
    reading = iter(iter_molecules(args.library, modality=MODALITY, limit=args.limit, featurizer=embedder.featurizer,
                                  workers=embedder.workers, progress=not args.no_progress))
    while True:
        t0 = time.perf_counter()
        try:
            mols, rejs = next(reading)
        except StopIteration:
            break
        t1 = time.perf_counter()
        got = embedder.embed(mols, MODALITY, spaces)
        t2 = time.perf_counter()
        fps.append(fingerprints.ecfp4_smiles(m.smiles for m in mols))
        t3 = time.perf_counter()
        for s in spaces:
            chunks[s].append(normalise(got[s]))
        read_s, embed_s, fp_s = read_s + t1 - t0, embed_s + t2 - t1, fp_s + t3 - t2
        n, rejected = n + len(mols), rejected + len(rejs)
    vectors = {s: np.concatenate(c) for s, c in chunks.items()}
    stage = {"molecules": n, "rejected": rejected, "spaces": spaces, "dim": embedder.dim,
             "read_seconds": read_s, "embed_seconds": embed_s, "ecfp4_seconds": fp_s,
             "total_seconds": time.perf_counter() - started,
             "read_molecules_per_s": n / read_s if read_s else None,
             "embed_molecules_per_s": n / embed_s if embed_s else None,
             "device": args.device, "batch_size": args.batch_size, "peak_rss_mib": peak_rss_mib()}
    return vectors, np.concatenate(fps), stage


def load_embeddings(args) -> tuple[dict, np.ndarray, dict]:
    directory = Path(args.embeddings)
    spaces = args.spaces or sorted(p.stem for p in directory.glob("*.npy") if p.stem != "ecfp4")
    vectors = {s: normalise(np.load(directory / f"{s}.npy", allow_pickle=False, mmap_mode="r")[:args.limit])
               for s in spaces}
    fp_file = directory / "ecfp4.npy"
    fps = np.load(fp_file, allow_pickle=False)[:args.limit] if fp_file.is_file() else None
    n = len(next(iter(vectors.values())))
    return vectors, fps, {"molecules": n, "spaces": spaces, "dim": int(next(iter(vectors.values())).shape[1]),
                          "from": str(directory), "peak_rss_mib": peak_rss_mib()}


def latency(index, queries: np.ndarray, k: int, params: dict) -> dict:
    single = []
    for q in queries:
        t = time.perf_counter()
        search_vectors(index, q[None], k, params)
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, rows = search_vectors(index, queries, k, params)
    batch = time.perf_counter() - t
    ms = 1e3 * np.asarray(single)
    return {"single_p50_ms": float(np.percentile(ms, 50)), "single_p95_ms": float(np.percentile(ms, 95)),
            "batch_ms_per_query": 1e3 * batch / len(queries), "batch_queries_per_s": len(queries) / batch}, rows


def bench_space(name: str, vectors: np.ndarray, args, rng) -> dict:
    import faiss

    n, dim = vectors.shape
    picks = rng.choice(n, min(args.queries, n), replace=False)
    queries = np.ascontiguousarray(vectors[picks])
    out = {"vectors": n, "dim": dim, "indexes": {}}
    truth = None
    kinds = [("flat", {})] + [IndexOptions(kind="approx", approx=a, hnsw_m=args.hnsw_m,
                                           ef_construction=args.ef_construction, ef_search=args.ef_search,
                                           ivf_nlist=args.ivf_nlist, ivf_nprobe=args.ivf_nprobe,
                                           seed=args.seed).resolve(n) for a in args.approx]
    for kind, params in kinds:
        t = time.perf_counter()
        index = build_vector_index([vectors], dim, kind, params)  # a list holding the one array: not copied
        built = time.perf_counter() - t
        size = faiss.serialize_index(index).nbytes
        figures, rows = latency(index, queries, args.k, params)
        if kind == "flat":
            truth = rows
        else:
            figures[f"recall_at_{args.k}"] = recall_at_k(rows, truth)
        out["indexes"][kind] = {"params": params, "build_seconds": built, "index_bytes": int(size),
                                "bytes_per_vector": size / n, **figures, "peak_rss_mib": peak_rss_mib()}
        line = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
        print(f"{name} {kind}: built in {built:.1f} s, {size / 2**20:.1f} MiB; {line}", flush=True)
        del index
    return out


def main(argv=None) -> int:
    d = IndexOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an export (or a pre-training output_dir): embeds the library")
    p.add_argument("--library", default="moses", help="named library, file or featurised dataset directory")
    p.add_argument("--limit", type=int, help="the first N molecules only")
    p.add_argument("--embeddings", help="read <space>.npy (and ecfp4.npy) from DIR instead of embedding")
    p.add_argument("--save-embeddings", help="write <space>.npy and ecfp4.npy to DIR for later runs")
    p.add_argument("--spaces", nargs="+", help="spaces to measure (default: every 2D space of the checkpoint)")
    p.add_argument("--approx", nargs="+", choices=APPROX, default=list(APPROX), help="approximate indexes measured")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=d.ef_construction)
    p.add_argument("--ef-search", type=int, default=d.ef_search)
    p.add_argument("--ivf-nlist", type=int, default=d.ivf_nlist)
    p.add_argument("--ivf-nprobe", type=int, default=d.ivf_nprobe)
    p.add_argument("--queries", type=int, default=1000, help="query vectors (library rows) for latency and recall")
    p.add_argument("--tanimoto-queries", type=int, default=20, help="queries timed for exact ECFP4 Tanimoto")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="featurising processes (0: the machine's cores)")
    p.add_argument("--threads", type=int, help="faiss threads (default: faiss's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", help="JSON file (default: benchmarks/out/retrieval_<library>_<N>.json)")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.embeddings:
        p.error("give --checkpoint (to embed the library) or --embeddings DIR")
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    vectors, fps, stage = load_embeddings(args) if args.embeddings else embed_library(args)
    n = stage["molecules"]
    print(f"library: {n:,} molecules, spaces {', '.join(vectors)} ({stage['dim']} dimensions)"
          + (f"; embedded at {stage['embed_molecules_per_s']:.0f} molecules/s ({args.device}), read at "
             f"{stage['read_molecules_per_s']:.0f}/s" if "embed_seconds" in stage else ""), flush=True)
    if args.save_embeddings:
        save = Path(args.save_embeddings)
        save.mkdir(parents=True, exist_ok=True)
        for s, v in vectors.items():
            np.save(save / f"{s}.npy", v, allow_pickle=False)
        np.save(save / "ecfp4.npy", fps, allow_pickle=False)
    result = {"library": args.library, "limit": args.limit, "checkpoint": args.checkpoint, "k": args.k,
              "queries": min(args.queries, n), "seed": args.seed, "faiss_threads": faiss.omp_get_max_threads(),
              "faiss": faiss.__version__, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                      "load_average_at_start": os.getloadavg()},
              "library_stage": stage, "spaces": {}}
    for s, v in vectors.items():
        result["spaces"][s] = bench_space(s, v, args, rng)
    if fps is not None and args.tanimoto_queries:
        counts = fingerprints.popcount(fps)
        picks = rng.choice(len(fps), min(args.tanimoto_queries, len(fps)), replace=False)
        times = []
        for i in picks:
            t = time.perf_counter()
            fingerprints.tanimoto_top_k(fps[i:i + 1], fps, args.k, counts)
            times.append(time.perf_counter() - t)
        ms = 1e3 * np.asarray(times)
        result["ecfp4_tanimoto"] = {"queries": len(picks), "single_p50_ms": float(np.percentile(ms, 50)),
                                    "single_p95_ms": float(np.percentile(ms, 95)), "bytes": int(fps.nbytes)}
        print(f"ECFP4 Tanimoto (exact, numpy popcount): p50 {result['ecfp4_tanimoto']['single_p50_ms']:.1f} ms, "
              f"p95 {result['ecfp4_tanimoto']['single_p95_ms']:.1f} ms per query", flush=True)
    result["peak_rss_mib"] = peak_rss_mib()
    result["machine"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews latencies
    name = Path(str(args.library)).name.replace(".", "_")
    out = Path(args.out) if args.out else OUT / f"retrieval_{name}_{args.limit or 'full'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
