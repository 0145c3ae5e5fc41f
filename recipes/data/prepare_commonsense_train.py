"""Concatenate LLM-Adapters' commonsense training sets into one training file (rows kept as they are).

Commonsense170K is the union of the eight sets' training rows; where only some sets are at hand (LLM-Adapters
publishes `dataset/<set>/train.json` for BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA), their union is the
training file of `recipes/smollm2_commonsense_*.yaml`:

    python recipes/data/prepare_commonsense_train.py --commonsense_dir DIR --out data/commonsense_train.json

DIR holds one folder per set (`boolq/train.json`, `ARC-Easy/train.json`, ...), each a JSON list of rows with
`instruction`, `input`, `output` and `answer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import milora  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from milora.io import read_json, write_json

TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
FIELDS = ("instruction", "input", "output", "answer")


def read_train_set(path: Path) -> list[dict]:
    """One set's rows, checked: a JSON list of objects with the LLM-Adapters fields."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected LLM-Adapters' dataset/<set>/train.json)")
    rows = read_json(path)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of rows")
    for index, row in enumerate(rows):
        missing = [f for f in FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"{path}: row {index} lacks {', '.join(missing)}")
    return rows


def concatenate_train_sets(commonsense_dir: str | Path, sets: tuple[str, ...] = TRAIN_SETS) -> list[dict]:
    """The rows of every set, set after set, in file order (the trainer shuffles)."""
    return [row for name in sets for row in read_train_set(Path(commonsense_dir) / name / "train.json")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commonsense_dir", required=True, help="folder with <set>/train.json per set")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--sets", default=",".join(TRAIN_SETS), help="set folders (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = concatenate_train_sets(args.commonsense_dir, tuple(s for s in args.sets.split(",") if s))
    except (OSError, ValueError) as error:
        print(f"prepare_commonsense_train: error: {error}", file=sys.stderr)
        return 2
    write_json(args.out, rows)
    print(f"prepare_commonsense_train: {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
