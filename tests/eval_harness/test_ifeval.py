"""IFEval: lm-eval's own `ifeval` task and checkers, offline (the punkt_tab fallback), on real IFEval prompts."""

from __future__ import annotations

import json
import time

import pytest

from eval_harness import cli as eval_cli
from eval_harness import ifeval, lm_eval_runner
from eval_harness.local_tasks import lm_eval_task_yaml, write_local_task_yaml
from milora.io import read_jsonl, write_jsonl
from tests.eval_harness.oracle_lm import ConstantLM, OracleLM

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@pytest.fixture(scope="module")
def checkers():
    """lm-eval's IFEval hooks, imported once the sentence model is in place (their import would download it)."""
    ifeval.ensure_sentence_tokenizer()
    from lm_eval.tasks.ifeval import utils

    return utils


@pytest.fixture(scope="module")
def ifeval_docs(fixtures_dir):
    return {row["key"]: row for row in read_jsonl(fixtures_dir / "ifeval_sample.jsonl")}


@pytest.fixture(scope="module")
def real_rows(shared_data_dir) -> list[dict]:
    return read_jsonl(shared_data_dir / "ifeval" / "input_data.jsonl")


def _outcome(checkers, doc: dict, response: str) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """(strict, loose) per-instruction verdicts of lm-eval's IFEval scorer."""
    out = checkers.process_results(doc, [response])
    return tuple(out["inst_level_strict_acc"]), tuple(out["inst_level_loose_acc"])


def test_offline_sentence_model_splits_sentences_but_not_abbreviations():
    import nltk

    ifeval.ensure_sentence_tokenizer()  # real punkt_tab or the fallback, never a download
    assert nltk.sent_tokenize("Dr. Smith came home at 5 p.m. today. He slept. Did he?") == [
        "Dr. Smith came home at 5 p.m. today.",
        "He slept.",
        "Did he?",
    ]


def test_no_comma_strict_and_loose(checkers, ifeval_docs):
    doc = ifeval_docs[1001]
    assert _outcome(checkers, doc, "Day one we see Kyoto and thou shalt rest")[0] == (True,)
    assert _outcome(checkers, doc, "Day one, we see Kyoto")[0] == (False,)
    # The loose variant also tries the response without its first line.
    assert _outcome(checkers, doc, "Here it is, good sir:\nDay one we see Kyoto") == ((False,), (True,))


def test_placeholders_count(checkers, ifeval_docs):
    doc = ifeval_docs[1005]
    twelve = " ".join(f"[field{i}]" for i in range(12))
    assert _outcome(checkers, doc, f"Resume of [name]: {twelve}")[0] == (True,)
    assert _outcome(checkers, doc, "Resume of [name] at [address]")[0] == (False,)


def test_repeat_prompt_and_title(checkers, ifeval_docs):
    doc = ifeval_docs[1012]
    request = doc["kwargs"][0]["prompt_to_repeat"]
    assert _outcome(checkers, doc, f"{request}\n<<Resignation>>\nDear boss I quit.")[0] == (True, True)
    assert _outcome(checkers, doc, "Dear boss I quit.")[0] == (False, False)
    assert _outcome(checkers, doc, "<<Resignation>> I quit.")[0] == (False, True)


def test_three_instructions_at_once(checkers, ifeval_docs):
    doc = ifeval_docs[1000]
    highlights = "*Early life* *Regency* *Crusades*"
    assert _outcome(checkers, doc, f"{highlights} {' '.join(['trip'] * 300)}")[0] == (True, True, True)
    assert _outcome(checkers, doc, f"{highlights} {' '.join(['trip'] * 50)}, and more")[0] == (False, True, False)


def test_sentence_counting_works_offline(checkers):
    doc = {
        "key": 1,
        "prompt": "Answer in fewer than 3 sentences.",
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"relation": "less than", "num_sentences": 3, "num_words": None}],
    }
    assert _outcome(checkers, doc, "It rains. It pours.")[0] == (True,)
    assert _outcome(checkers, doc, "It rains. It pours. It floods.")[0] == (False,)


def test_the_fixture_rows_are_real_ifeval_rows(ifeval_docs, real_rows):
    real = {row["key"]: row for row in real_rows}
    assert len(real_rows) == 541
    assert all(real[key] == doc for key, doc in ifeval_docs.items())


@pytest.mark.parametrize("response", ["", " \n ", "*", "<<>>\n\n***\n\x00", "Ünïcödé … ✓ " * 50, "word " * 1000])
def test_no_real_row_crashes_or_hangs_the_scorer(checkers, real_rows, response):
    start = time.perf_counter()
    for row in real_rows:
        strict, loose = _outcome(checkers, row, response)
        assert len(strict) == len(loose) == len(row["instruction_id_list"])
        if not response.strip():
            assert not any(strict) and not any(loose)  # an empty response follows nothing
    assert time.perf_counter() - start < 60


def _ifeval_manager(tmp_path, rows):
    data = write_jsonl(tmp_path / "data" / "ifeval.jsonl", rows)
    write_local_task_yaml(lm_eval_task_yaml("ifeval"), data, tmp_path / "tasks")
    return lm_eval_runner.task_manager([tmp_path / "tasks"])


def test_lm_eval_ifeval_task_on_real_rows_scores_exactly(tmp_path, real_rows):
    by_key = {row["key"]: row for row in real_rows}
    manager = _ifeval_manager(tmp_path, [by_key[1001], by_key[1012]])
    # 1001 (no commas): followed; 1012 (repeat the request, then a <<title>>): only the title.
    oracle = OracleLM({"itinerary": "Day one we see Kyoto", "quitting": "<<Resignation>> I quit."})
    run = lm_eval_runner.run_tasks(oracle, ["ifeval"], manager, keep_going=False)
    expected = dict.fromkeys(("prompt_level_strict_acc", "prompt_level_loose_acc"), 0.5)
    expected.update(dict.fromkeys(("inst_level_strict_acc", "inst_level_loose_acc"), 2 / 3))
    assert {m: run.metrics["ifeval"][m] for m in METRICS} == pytest.approx(expected)
    empty = lm_eval_runner.run_tasks(ConstantLM(""), ["ifeval"], _ifeval_manager(tmp_path / "all", real_rows),
                                     limit=40, keep_going=False)  # fmt: skip
    assert {m: empty.metrics["ifeval"][m] for m in METRICS} == dict.fromkeys(METRICS, 0.0)
    assert empty.metrics["ifeval"]["n"] == 40


def test_ifeval_suite_runs_lm_evals_own_task_on_the_data_folder(tiny_llama_dir, tmp_path, shared_data_dir):
    out = tmp_path / "ifeval"
    status = eval_cli.main(
        [
            "--suite",
            "ifeval",
            "--model",
            str(tiny_llama_dir),
            "--output_dir",
            str(out),
            "--data_dir",
            str(shared_data_dir),
            "--limit",
            "2",
            "--max_gen_toks",
            "4",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    assert status == eval_cli.EXIT_OK
    report = json.loads((out / "results.json").read_text())
    assert report["data_sources"] == {"ifeval": str(shared_data_dir / "ifeval" / "input_data.jsonl")}
    assert set(METRICS) <= set(report["metrics"]["ifeval"]) and report["metrics"]["ifeval"]["n"] == 2
    samples = [json.loads(line) for line in (out / "samples" / "ifeval.jsonl").read_text().splitlines()]
    assert [s["doc"]["key"] for s in samples] == [1000, 1001]
