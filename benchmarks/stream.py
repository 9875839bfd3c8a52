"""Molecules/s of the training stream of one source (``flexmol.data.streams.SourceStream``: read,
record checks, shuffle, decode, atom-budget batching, collation in the loader workers), as
pre-training consumes it. Run it with PYTHONPATH set to another revision's checkout to compare.

    python benchmarks/stream.py DATASET_DIR [--workers 2] [--batches 200] [--max-atoms 2048]
"""
import argparse
import time

from flexmol.data.streams import SourceStream, dataset_urls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="a 2D dataset directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--max-atoms", type=int, default=2048)
    args = p.parse_args()
    stream = SourceStream("single_2d", dataset_urls([args.dataset]), max_atoms=args.max_atoms, seed=0,
                          shuffle_buffer=1000, num_workers=args.workers)
    next(stream)  # start-up is not throughput
    started, molecules = time.perf_counter(), 0
    for _ in range(args.batches):
        molecules += next(stream)["mask"].shape[0]
    took = time.perf_counter() - started
    print(f"{molecules} molecules in {took:.2f} s = {molecules / took:.0f} molecules/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
