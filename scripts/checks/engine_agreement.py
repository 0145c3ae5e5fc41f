"""Compare two `milora eval` runs of the same suite, e.g. ``--engine milora`` against ``--engine hf``: for each
task, how many responses are identical, the differing items (first few shown), and each metric of both runs.

    python scripts/checks/engine_agreement.py RUN_A RUN_B [--show 5] [--out agreement.json]

RUN_A and RUN_B are `milora eval` output folders (results.json + samples/<task>.jsonl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from milora.io import read_json, read_jsonl, write_json


def compare(run_a: Path, run_b: Path, show: int) -> dict:
    report: dict = {"runs": [str(run_a), str(run_b)], "tasks": {}}
    metrics_a, metrics_b = read_json(run_a / "results.json")["metrics"], read_json(run_b / "results.json")["metrics"]
    for samples_a in sorted((run_a / "samples").glob("*.jsonl")):
        samples_b = run_b / "samples" / samples_a.name
        if not samples_b.is_file() or ".generations" in samples_a.name:  # the store of `generation_store`
            continue
        rows_a = {row["doc_id"]: row for row in read_jsonl(samples_a)}
        rows_b = {row["doc_id"]: row for row in read_jsonl(samples_b)}
        common = sorted(set(rows_a) & set(rows_b))
        differing = [d for d in common if json.dumps(rows_a[d]["response"]) != json.dumps(rows_b[d]["response"])]
        task = samples_a.stem
        report["tasks"][task] = {
            "items": len(common),
            "identical": len(common) - len(differing),
            "identical_share": (len(common) - len(differing)) / max(1, len(common)),
            "differing_doc_ids": differing,
            "examples": [
                {"doc_id": d, "a": rows_a[d]["response"], "b": rows_b[d]["response"],
                 "metrics_a": rows_a[d]["metrics"], "metrics_b": rows_b[d]["metrics"]}
                for d in differing[:show]
            ],  # fmt: skip
            "metrics_a": metrics_a.get(task, {}),
            "metrics_b": metrics_b.get(task, {}),
        }
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--show", type=int, default=5, help="differing items to print per task")
    parser.add_argument("--out", type=Path, help="write the whole comparison as JSON")
    args = parser.parse_args(argv)
    report = compare(args.run_a, args.run_b, args.show)
    for task, entry in report["tasks"].items():
        print(f"{task}: {entry['identical']} of {entry['items']} responses identical ({entry['identical_share']:.2%})")
        for name in sorted(set(entry["metrics_a"]) | set(entry["metrics_b"])):
            a, b = entry["metrics_a"].get(name), entry["metrics_b"].get(name)
            print(f"  {name}: {a} vs {b}")
        for example in entry["examples"]:
            print(f"  doc {example['doc_id']}:\n    A: {example['a']!r:.300}\n    B: {example['b']!r:.300}")
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
