"""The alignment report of a pre-training run's export on the run's own held-out shards (the last
``validation.holdout_shards`` shards of each paired dataset), as the trainer computes it at the
end of a stage; for runs made with ``validation.alignment_count=0`` or to compare stages on the
same molecules.

    .venv/bin/python benchmarks/alignment_of_run.py --run outputs/bench9/stage1 \\
        --data outputs/bench9/shards/qm9 outputs/bench9/shards/moses_paired [--count 1000]
"""
import argparse
import json
import sys
from pathlib import Path

from flexmol import load_pretrained
from flexmol.data.streams import dataset_urls, heldout_records
from flexmol.evaluate.alignment import format_report, records_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a pre-training output_dir (its export/ is read)")
    p.add_argument("--data", nargs="+", required=True, help="the run's paired dataset directories")
    p.add_argument("--holdout-shards", type=int, default=1)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--out", help="JSON file (default: RUN/alignment_heldout.json)")
    args = p.parse_args()
    urls = [u for d in args.data for u in dataset_urls([d])[-args.holdout_shards:]]
    report = records_report(load_pretrained(Path(args.run) / "export"), heldout_records(urls, args.count))
    report["data"] = urls
    out = Path(args.out or Path(args.run) / "alignment_heldout.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
