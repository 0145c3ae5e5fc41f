"""Forgetting loss of a finetune on a text corpus (Kalajdzievski 2024; MiLoRA paper, section 5.4).

Text (a local file or a hub dataset; WikiText-103 test by default) is tokenized as one stream and cut
into blocks of `seq_len` tokens (each starting with BOS when the tokenizer has one). Both models read the
same blocks, batched; at every real token position, with p the base model's and q the tuned model's
next-token distribution (float64, see `metrics.next_token_divergence_sums`):

- ``forgetting_loss`` = mean KL(p || q) = CE(p, q) - H(p): 0 for identical models;
- ``cross_entropy``   = mean CE(p, q) = -sum_v p_v log q_v (Kalajdzievski's forgetting loss, which for
  identical models equals ``base_entropy``);
- ``base_entropy``    = mean H(p);
- ``base_lm_loss`` / ``tuned_lm_loss`` = each model's mean next-token NLL on the text itself.

Means are over all counted token positions of all blocks (not a mean of per-block means).

`sequence_nll` is one model's NLL of token sequences (optionally of each one's completion after its prompt),
batched the same way (`pad_batches`); scripts/miniature_worker.py scores its forgetting rows with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from milora.analysis import metrics
from milora.io import iter_jsonl, read_json

DEFAULT_FORGETTING_DATA = "wikitext:wikitext-103-raw-v1:test"
TEXT_FIELDS = ("text", "content", "document")

DEFINITION = (
    "forgetting_loss = mean over token positions of KL(p_base || p_tuned) = CE(p_base, p_tuned) - H(p_base), "
    "with p the next-token distributions of the two models (0 for identical models); "
    "cross_entropy = mean CE(p_base, p_tuned) = -sum_v p_base(v) log p_tuned(v) (Kalajdzievski 2024; "
    "equals base_entropy for identical models); base_entropy = mean H(p_base); "
    "*_lm_loss = mean next-token NLL of each model on the text itself."
)


def _texts_from_records(records: Iterable[dict], source: str) -> Iterator[str]:
    field = None
    for record in records:
        if field is None:
            field = next((f for f in TEXT_FIELDS if isinstance(record.get(f), str)), None)
            if field is None:
                field = next((k for k, v in record.items() if isinstance(v, str)), None)
            if field is None:
                raise ValueError(f"{source}: no text field in records (looked for {', '.join(TEXT_FIELDS)})")
        yield record[field]


def iter_texts(spec: str) -> Iterator[str]:
    """The texts of a forgetting corpus, lazily.

    `spec` is a local file (`.jsonl`/`.json`: records with a `text` field, else the first string field;
    anything else: plain text, read line by line with newlines kept), or a dataset for `datasets.load_dataset`
    as `NAME[:CONFIG[:SPLIT]]` (split `test` by default, streamed): a hub id such as
    `wikitext:wikitext-103-raw-v1:test`, or a local folder of data files (`DIR`, `DIR::train`).
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".jsonl":
            yield from _texts_from_records(iter_jsonl(path), spec)
        elif path.suffix == ".json":
            data = read_json(path)
            yield from _texts_from_records(data if isinstance(data, list) else [data], spec)
        else:
            with path.open() as handle:
                yield from handle
        return
    if path.is_dir():
        name, config, split = spec, None, None
    else:
        name, config, split = (spec.split(":") + [None, None])[:3]
        if not Path(name).is_dir() and (
                spec.startswith((".", os.sep, "~")) or path.suffix in (".txt", ".json", ".jsonl")):
            raise FileNotFoundError(f"forgetting data {spec!r} is not a readable file")
    import datasets

    # Streaming: only the rows read are fetched (WikiText-103's train split alone is hundreds of MB).
    dataset = datasets.load_dataset(name, config or None, split=split or "test", streaming=True)
    yield from _texts_from_records(dataset, spec)


def token_blocks(
    texts: Iterable[str], tokenizer, seq_len: int, max_samples: int | None
) -> list[list[int]]:
    """Up to `max_samples` blocks of `seq_len` token ids from the concatenated texts (BOS first when the
    tokenizer has one); the last block may be shorter. Stops reading texts once enough tokens are in."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = seq_len - len(bos)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text")
    needed = None if max_samples is None else max_samples * body
    stream: list[int] = []
    for text in texts:
        if not text:
            continue
        # verbose=False: a long line is not one model input, so the max-length warning does not apply.
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if needed is not None and len(stream) >= needed:
            break
    if needed is not None:
        stream = stream[:needed]
    return [bos + stream[start:start + body] for start in range(0, len(stream), body)]


def pad_batches(
    sequences: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Token id sequences, `batch_size` at a time in the order given, as `(input_ids, attention_mask)` long
    tensors right-padded to the batch's longest sequence with `pad_id` (mask 1 on real tokens, 0 on padding):
    the model inputs of `forgetting_loss` and `sequence_nll`."""
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(sequence) for sequence in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
        yield input_ids, attention_mask


@torch.inference_mode()
def sequence_nll(
    model,
    sequences: list[list[int]],
    prompt_lengths: list[int] | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """A model's mean next-token negative log-likelihood (nats per token, float64 sums) of token `sequences`,
    counting each sequence's tokens from index `prompt_lengths[i]` on: the loss of a completion given its
    prompt (default: every token after the first, as `forgetting_loss`'s `*_lm_loss`).

    Sequences are batched shortest first (less padding) by `pad_batches` and scored by
    `metrics.next_token_nll_sum`; `device` defaults to the model's. Returns `nll` (the mean over counted tokens),
    `nll_sum` and `token_count`; raises ValueError when no token is counted."""
    if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(sequences)} sequences")
    starts = list(prompt_lengths) if prompt_lengths is not None else [1] * len(sequences)
    device = next(model.parameters()).device if device is None else device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    total, count = 0.0, 0
    batches = pad_batches([sequences[i] for i in order], batch_size, pad_id)
    for start, (input_ids, attention_mask) in zip(range(0, len(order), batch_size), batches, strict=True):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        first = [starts[i] for i in order[start:start + batch_size]]
        sums = metrics.next_token_nll_sum(logits, input_ids, attention_mask, first_target=first)
        total, count = total + sums["nll_sum"], count + sums["token_count"]
    if count == 0:
        raise ValueError("no tokens to score: every sequence ends within its prompt")
    return {"nll": total / count, "nll_sum": total, "token_count": count}


@torch.inference_mode()
def forgetting_loss(
    base_model,
    tuned_model,
    blocks: list[list[int]],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pad_id: int = 0,
    show_progress: bool = True,
) -> dict:
    """Forgetting metrics (module docstring) of `tuned_model` against `base_model` on token `blocks`."""
    from tqdm.auto import tqdm

    if not blocks:
        raise ValueError("no token blocks: the forgetting data has no text")
    sums = {"base_entropy_sum": 0.0, "cross_entropy_sum": 0.0, "kl_sum": 0.0, "token_count": 0}
    nll = {"base": 0.0, "tuned": 0.0, "token_count": 0}
    batches = pad_batches(blocks, batch_size, pad_id)
    total = (len(blocks) + batch_size - 1) // batch_size
    for input_ids, attention_mask in tqdm(batches, total=total, desc="forgetting loss", disable=not show_progress):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        base_logits = base_model(input_ids=input_ids, attention_mask=attention_mask).logits
        tuned_logits = tuned_model(input_ids=input_ids, attention_mask=attention_mask).logits
        for key, value in metrics.next_token_divergence_sums(base_logits, tuned_logits, attention_mask).items():
            sums[key] += value
        base_nll = metrics.next_token_nll_sum(base_logits, input_ids, attention_mask)
        tuned_nll = metrics.next_token_nll_sum(tuned_logits, input_ids, attention_mask)
        nll["base"] += base_nll["nll_sum"]
        nll["tuned"] += tuned_nll["nll_sum"]
        nll["token_count"] += base_nll["token_count"]
    count = sums["token_count"]
    return {
        "definition": DEFINITION,
        "forgetting_loss": sums["kl_sum"] / count,
        "cross_entropy": sums["cross_entropy_sum"] / count,
        "base_entropy": sums["base_entropy_sum"] / count,
        "base_lm_loss": nll["base"] / nll["token_count"] if nll["token_count"] else None,
        "tuned_lm_loss": nll["tuned"] / nll["token_count"] if nll["token_count"] else None,
        "num_sequences": len(blocks),
        "num_tokens": count,
    }
