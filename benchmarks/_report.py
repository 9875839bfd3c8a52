"""Shared by the benchmark scripts: write the results to benchmarks/out/NAME.json and print them."""
import json
from pathlib import Path


def report(name: str, res: dict) -> None:
    out = Path(__file__).with_name("out")
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    width = max(len(k) for k in res) + 2
    for k, v in res.items():
        print(f"{k:{width}s} {v:.3f}" if isinstance(v, float) else f"{k:{width}s} {v}")
