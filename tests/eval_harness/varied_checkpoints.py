"""Tiny checkpoints whose greedy answers vary from prompt to prompt, and `milora eval` run on them in-process.

The tiny llama and qwen2 have their embeddings and output layer scaled up (answers that depend on the prompt)
and the end-of-sequence row of the output layer raised (some answers end early).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from milora.cli import main as milora_main
from milora.io import read_jsonl
from milora.tiny import tiny_model, tiny_tokenizer

QUESTIONS = ["What is 2+3?", "Janet has ducks.", "Hello there", "A long question about trains and stations", "Zz"]


def varied_model(kind: str, eos_boost: float = 0.8):
    """The tiny model with embeddings and output layer scaled (answers that depend on the prompt) and the EOS
    row of the output layer raised by `eos_boost` standard deviations (some answers end early)."""
    model = tiny_model(kind)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
        head = model.get_output_embeddings().weight
        head.mul_(8)
        head[model.config.eos_token_id].add_(eos_boost * head.std())
    return model


def save_varied_checkpoint(kind: str, path: Path, eos_boost: float = 0.8) -> Path:
    """`varied_model(kind, eos_boost)` and the tiny tokenizer, saved to `path`."""
    model = varied_model(kind, eos_boost)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run_eval(model: Path, out: Path, engine: str, *args: str) -> tuple[dict, dict[str, list]]:
    """`milora eval` with `engine`: (metrics, {task: (doc_id, prompt, response) of each sample}) it wrote."""
    status = milora_main(["eval", "--model", str(model), "--output_dir", str(out), "--engine", engine,
                          "--device", "cpu", *args])  # fmt: skip
    assert status == 0
    report = json.loads((out / "results.json").read_text())
    samples = {
        path.name[: -len(".jsonl")]: [(row["doc_id"], row["prompt"], row["response"]) for row in read_jsonl(path)]
        for path in (out / "samples").glob("*.jsonl")
        if ".generations" not in path.name
    }
    return report["metrics"], samples
