"""`milora eval` on two processes (``accelerate launch --multi_gpu --num_processes 2``, on CPU through gloo):
each process generates its share with the engine, rank 0 alone writes the report, and the scores and samples
are those of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from milora.io import read_jsonl, write_jsonl
from tests.eval_harness.varied_checkpoints import QUESTIONS, run_eval, save_varied_checkpoint

pytestmark = pytest.mark.multiprocess
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_scores_and_samples_of_one(tmp_path):
    model = save_varied_checkpoint("qwen2", tmp_path / "model")
    rows = [{"question": q, "answer": f"Add them.\n#### {n}"} for n, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    args = ["--suite", "gsm8k", "--gsm8k_file", str(data), "--max_gen_toks", "40"]
    one = run_eval(model, tmp_path / "one", "milora", *args)

    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(_free_port()), "-m", "eval_harness.cli", "--model", str(model),
               "--output_dir", str(out), "--engine", "milora", "--device", "cpu", *args]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 reports
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    samples = [
        (row["doc_id"], row["prompt"], row["response"]) for row in read_jsonl(out / "samples" / "milora_gsm8k.jsonl")
    ]
    assert (metrics, {"milora_gsm8k": samples}) == one
    # each process generated its share (5 documents: 3 and 2, padded to 3) and stored it
    shares = [read_jsonl(out / "samples" / f"milora_gsm8k.generations.rank{rank}.jsonl") for rank in (0, 1)]
    assert sorted({row["doc_id"] for share in shares for row in share}) == list(range(len(QUESTIONS)))
    assert all(len(share) == 3 for share in shares)
