"""The pre-tokenized batches of the training-throughput benchmark: built once, saved, read by every variant.

Rows are MetaMathQA-like: prompt + response lengths drawn from a seeded log-normal distribution (median
240 tokens, sigma 0.4, clipped to 100-600, mean ~250), the prompt 30-50% of the row, loss on the response
only; token ids are random (the model's weights are random too). The same rows, in the same order, form two
groupings, both saved:

- `fixed`: `batch_size` consecutive rows per optimizer step;
- `budget`: consecutive rows until the next one would exceed `token_budget` tokens (token-budget batching).

A step's tokens are the real tokens of its rows (no padding), counted here, not by the model.
"""

from __future__ import annotations

import hashlib
import math
import random

LENGTHS = {"median": 240, "sigma": 0.4, "min": 100, "max": 600, "prompt_fraction": (0.3, 0.5)}
TINY_LENGTH_SCALE = 10  # the tiny smoke model sees the same distribution divided by 10 (10-60 tokens)


def row_lengths(count: int, seed: int, scale: int = 1) -> list[tuple[int, int]]:
    """(prompt_length, total_length) of `count` rows."""
    rng = random.Random(seed)
    low, high = LENGTHS["min"] // scale, LENGTHS["max"] // scale
    rows = []
    for _ in range(count):
        total = rng.lognormvariate(math.log(LENGTHS["median"] / scale), LENGTHS["sigma"])
        total = min(high, max(low, round(total)))
        prompt = round(total * rng.uniform(*LENGTHS["prompt_fraction"]))
        rows.append((prompt, total))
    return rows


def make_rows(count: int, vocab_size: int, seed: int = 0, scale: int = 1) -> list[dict]:
    """Rows with `input_ids` (BOS ... EOS) and `labels` (-100 on the prompt)."""
    rng = random.Random(seed + 1)
    rows = []
    for prompt, total in row_lengths(count, seed, scale):
        ids = [1] + [rng.randrange(3, vocab_size) for _ in range(total - 2)] + [2]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def fixed_groups(lengths: list[int], batch_size: int, count: int) -> list[list[int]]:
    groups = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(count)]
    if groups and groups[-1][-1] >= len(lengths):
        raise ValueError(f"{len(lengths)} rows are too few for {count} batches of {batch_size}")
    return groups


def budget_groups(lengths: list[int], token_budget: int, count: int) -> list[list[int]]:
    """Greedy in row order: a batch takes rows while their tokens stay within the budget."""
    if max(lengths) > token_budget:
        raise ValueError(f"token_budget {token_budget} is smaller than the longest row ({max(lengths)} tokens)")
    groups, current, tokens = [], [], 0
    for index, length in enumerate(lengths):
        if tokens + length > token_budget:
            groups.append(current)
            current, tokens = [], 0
            if len(groups) == count:
                return groups
        current.append(index)
        tokens += length
    raise ValueError(f"{len(lengths)} rows are too few for {count} batches of {token_budget} tokens")


def build_batches(spec: dict, vocab_size: int) -> dict:
    """The saved benchmark data: spec, rows and both groupings of `warmup + steps` batches."""
    count = spec["warmup"] + spec["steps"]
    scale = TINY_LENGTH_SCALE if spec["model"] == "tiny" else 1
    mean_length = sum(total for _, total in row_lengths(1000, spec["seed"], scale)) / 1000
    n_rows = 2 * count * max(spec["batch_size"], math.ceil(spec["token_budget"] / mean_length))
    rows = make_rows(n_rows, vocab_size, spec["seed"], scale)
    lengths = [len(row["input_ids"]) for row in rows]
    groupings = {
        "fixed": fixed_groups(lengths, spec["batch_size"], count),
        "budget": budget_groups(lengths, spec["token_budget"], count),
    }
    # both groupings take consecutive rows from the first: keep the rows up to the last one used
    rows = rows[:1 + max(groups[-1][-1] for groups in groupings.values())]
    return {"spec": {**spec, "vocab_size": vocab_size, "lengths": LENGTHS, "length_scale": scale},
            "rows": rows, "groupings": groupings}


def batch_lengths(data: dict, grouping: str) -> list[list[int]]:
    """Real tokens of each row of each batch of a grouping."""
    return [[len(data["rows"][i]["input_ids"]) for i in batch] for batch in data["groupings"][grouping]]


def rows_digest(rows: list[list[int]]) -> str:
    """A digest of token rows in order: equal digests mean the same rows were trained in the same order."""
    digest = hashlib.sha1()
    for ids in rows:
        digest.update(",".join(map(str, ids)).encode())
        digest.update(b";")
    return digest.hexdigest()[:16]
