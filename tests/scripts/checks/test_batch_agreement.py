"""scripts/checks/batch_agreement.py on tiny models on the CPU: the answers' cut, the first divergence, the logit
margin there (against float64), a real `milora eval` samples folder in float32 (every pair identical) and real
differences in bfloat16."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from milora.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from tests.conftest import REPO_ROOT, load_script

batch_agreement = load_script("scripts/checks/batch_agreement.py")
MATH_FIXTURE = REPO_ROOT / "tests" / "eval_harness" / "fixtures" / "math_test.jsonl"
TINY_MATH = REPO_ROOT / "recipes" / "data" / "tiny_math.jsonl"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the machine's cores are shared, and bfloat16 sums then round the same every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama"))


def question_prompts(path, count: int):
    """The recipes' tiny math questions as {"prompt"} rows."""
    rows = [json.loads(line) for line in TINY_MATH.read_text().splitlines()][:count]
    path.write_text("".join(json.dumps({"prompt": f"Question: {r['query']}\nAnswer:"}) + "\n" for r in rows))
    return path


def test_answer_tokens_end_at_eos_and_at_the_token_completing_a_stop_string():
    tokenizer = tiny_tokenizer()

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=False)

    tokens = tokenizer("x = 4. Question: next", add_special_tokens=False).input_ids
    cut = batch_agreement.answer_tokens(tokens, {tokenizer.eos_token_id}, ["Question:"], decode)
    assert decode(cut) == "x = 4. Question:"
    assert batch_agreement.answer_tokens(tokens, set(), ["nowhere"], decode) == tokens
    ended = batch_agreement.answer_tokens([*tokens[:3], tokenizer.eos_token_id, *tokens[3:]], {2}, [], decode)
    assert ended == [*tokens[:3], tokenizer.eos_token_id]


def test_first_divergence():
    assert batch_agreement.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert batch_agreement.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert batch_agreement.first_divergence([1, 2], [1, 2, 3]) == 2


def test_requests_from_milora_and_lm_eval_sample_rows():
    settings = {"until": ["Question:"], "max_gen_toks": 12, "do_sample": False}
    rows = [
        {"doc_id": 0, "prompt": "Q1", "generation_kwargs": settings},
        {"doc_id": 1, "arguments": [["Q2", {"until": "\n\n"}]]},
        {"prompt": "Q3"},
    ]
    requests = batch_agreement.read_requests(rows, None)
    assert requests == [
        {"prompt": "Q1", "until": ["Question:"], "max_new_tokens": 12},
        {"prompt": "Q2", "until": ["\n\n"], "max_new_tokens": batch_agreement.DEFAULT_MAX_NEW_TOKENS},
        {"prompt": "Q3", "until": [], "max_new_tokens": batch_agreement.DEFAULT_MAX_NEW_TOKENS},
    ]
    assert [r["max_new_tokens"] for r in batch_agreement.read_requests(rows, 5)] == [5, 5, 5]
    with pytest.raises(ValueError, match="row 1 has no prompt"):
        batch_agreement.read_requests([{"doc_id": 3}], None)


def test_margin_at_the_first_divergence_favours_the_model_that_chose_the_token():
    """Greedy answers of a model and of a perturbed copy part somewhere; there each model's teacher-forced
    logits rank its own token above the other's."""
    model = tiny_model("llama").eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        head = perturbed.get_output_embeddings().weight
        head.add_(0.02 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    tokenizer = tiny_tokenizer()
    requests = [{"prompt": p, "until": [], "max_new_tokens": 24} for p in ("2 + 2 =", "The cat", "Solve x", "abc")]
    prompts = [tokenizer(r["prompt"]).input_ids for r in requests]
    eos = [tokenizer.eos_token_id]
    own = batch_agreement.generate_hf(model, requests, prompts, 1, tokenizer, eos)
    other = batch_agreement.generate_hf(perturbed, requests, prompts, 1, tokenizer, eos)
    # the margins under both models (in the slots of the run's dtype and of float32)
    differences = batch_agreement.compare_pair(own, other, prompts, {"dtype": model, "float32": perturbed})
    assert len(differences) >= 2
    for d in differences:
        item, position = d["item"], d["position"]
        assert own[item][:position] == other[item][:position] and own[item][position] != other[item][position]
        assert d["margin_dtype"] > 0 and d["choice_dtype"] == d["first_token"] == own[item][position]
        assert d["margin_float32"] < 0 and d["choice_float32"] == d["second_token"] == other[item][position]


def test_float32_answers_of_a_milora_eval_run_are_identical_in_every_pair(tiny_dir, tmp_path, capsys):
    from milora.cli import main as milora_main

    run = tmp_path / "run"
    status = milora_main(["eval", "--suite", "competition_math", "--model", str(tiny_dir), "--math_file",
                          str(MATH_FIXTURE), "--limit", "3", "--max_gen_toks", "16", "--max_length", "512",
                          "--device", "cpu", "--output_dir", str(run)])  # fmt: skip
    assert status == 0
    out = tmp_path / "agreement"
    argv = [str(tiny_dir), str(run), "--task", "milora_math", "--dtype", "float32", "--hf_batch", "2"]
    assert batch_agreement.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "batch_agreement.json").read_text())
    samples = [json.loads(line) for line in (run / "samples" / "milora_math.jsonl").read_text().splitlines()]
    assert report["items"] == 3 and report["dtype"] == "torch.float32"
    for entry in report["pairs"].values():
        assert entry["summary"]["identical"] == 3 and entry["differences"] == []
    for row, answer in zip(samples, report["answers"], strict=True):
        assert answer["prompt"] == row["prompt"]
        assert 0 < len(answer["tokens"]["engine"]) <= 16  # the run's max_gen_toks
        assert answer["engine"] == answer["hf_batch1"] == answer["hf_batchB"]
        assert row["response"][0] in answer["engine"]  # lm-eval's answer: the same text, cut at a stop string
    assert "| engine vs hf_batch2 | 3/3 | 100.0% |" in capsys.readouterr().out


def test_bfloat16_differences_are_found_and_measured_against_float64(tiny_dir, tmp_path):
    prompts = question_prompts(tmp_path / "prompts.jsonl", 16)
    out = tmp_path / "agreement"
    argv = [str(tiny_dir), str(prompts), "--dtype", "bfloat16", "--max_new_tokens", "64", "--hf_batch", "8"]
    assert batch_agreement.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "batch_agreement.json").read_text())
    differences = [(pair, d) for pair, entry in report["pairs"].items() for d in entry["differences"]]
    assert differences  # bfloat16 batchings round differently: near-ties of the tiny model's logits part them
    # the weights the run used (the checkpoint rounded to bfloat16), exactly, in float64
    reference = tiny_model("llama").to(torch.bfloat16).to(torch.float64).eval()
    for pair, d in differences:
        first, second = pair.split(" vs ")
        answer = report["answers"][d["item"]]
        a, b = answer["tokens"][first], answer["tokens"][second]
        position = d["position"]
        assert a[:position] == b[:position] and a[position] != b[position]
        margin64, _ = batch_agreement.logit_margin(reference, answer["prompt_tokens"] + a[:position], a[position],
                                                   b[position])  # fmt: skip
        assert d["margin_float32"] == pytest.approx(margin64, abs=1e-5)
        assert abs(d["margin_float32"]) < 0.05  # the tiny model's near-ties
    summary = report["pairs"]["engine vs hf_batch1"]["summary"]
    assert summary["identical"] == 16 - len(report["pairs"]["engine vs hf_batch1"]["differences"])


def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "milora_gsm8k.jsonl").write_text("")
    status = batch_agreement.run_command("batch_agreement.py", batch_agreement.main,
                                         [str(tiny_dir), str(run), "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--task" in error and "milora_gsm8k" in error
    status = batch_agreement.run_command("batch_agreement.py", batch_agreement.main,
                                         [str(tmp_path), str(run), "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2 and "config.json" in capsys.readouterr().err
