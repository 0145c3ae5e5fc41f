"""IFEval scoring (lm-eval's checkers, offline) and FollowBench satisfaction rates, on fixtures."""

from __future__ import annotations

import json

import pytest

from eval_harness import followbench as fb
from eval_harness import ifeval


@pytest.fixture(scope="module")
def ifeval_docs(fixtures_dir):
    rows = [json.loads(line) for line in (fixtures_dir / "ifeval_sample.jsonl").read_text().splitlines()]
    return {row["key"]: row for row in rows}


def _words(n: int) -> str:
    return " ".join(["trip"] * n)


def test_sentence_model_is_available_offline():
    assert ifeval.ensure_sentence_tokenizer()  # real punkt_tab or the fallback, never a download


def test_no_comma_strict_and_loose(ifeval_docs):
    doc = ifeval_docs[1001]
    assert ifeval.check_response(doc, "Day one we see Kyoto and thou shalt rest").strict == (True,)
    assert ifeval.check_response(doc, "Day one, we see Kyoto").strict == (False,)
    # The loose variant also tries the response without its first line.
    with_preamble = ifeval.check_response(doc, "Here it is, good sir:\nDay one we see Kyoto")
    assert with_preamble.strict == (False,) and with_preamble.loose == (True,)


def test_placeholders_count(ifeval_docs):
    doc = ifeval_docs[1005]
    twelve = " ".join(f"[field{i}]" for i in range(12))
    assert ifeval.check_response(doc, f"Resume of [name]: {twelve}").strict == (True,)
    assert ifeval.check_response(doc, "Resume of [name] at [address]").strict == (False,)


def test_repeat_prompt_and_title(ifeval_docs):
    doc = ifeval_docs[1012]
    request = doc["kwargs"][0]["prompt_to_repeat"]
    good = f"{request}\n<<Resignation>>\nDear boss I quit."
    assert ifeval.check_response(doc, good).strict == (True, True)
    assert ifeval.check_response(doc, "Dear boss I quit.").strict == (False, False)
    assert ifeval.check_response(doc, "<<Resignation>> I quit.").strict == (False, True)


def test_three_instructions_at_once(ifeval_docs):
    doc = ifeval_docs[1000]
    highlights = "*Early life* *Regency* *Crusades*"
    response = f"{highlights} {_words(300)}"
    assert ifeval.check_response(doc, response).strict == (True, True, True)
    short = f"{highlights} {_words(50)}, and more"
    assert ifeval.check_response(doc, short).strict == (False, True, False)


def test_sentence_counting_works_offline():
    doc = {
        "key": 1,
        "prompt": "Answer in fewer than 3 sentences.",
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"relation": "less than", "num_sentences": 3, "num_words": None}],
    }
    assert ifeval.check_response(doc, "It rains. It pours.").strict == (True,)
    assert ifeval.check_response(doc, "It rains. It pours. It floods.").strict == (False,)


def test_ifeval_metrics_aggregate_prompt_and_instruction_level(ifeval_docs):
    docs = [ifeval_docs[1001], ifeval_docs[1012]]
    responses = ["Day one we see Kyoto", "<<Resignation>> I quit."]  # 1/1 followed, then 1/2
    metrics = ifeval.score_responses(docs, responses)
    assert metrics["prompt_level_strict_acc"] == 0.5
    assert metrics["inst_level_strict_acc"] == pytest.approx(2 / 3)
    assert metrics["prompt_level_loose_acc"] >= metrics["prompt_level_strict_acc"]
    assert metrics["inst_level_loose_acc"] >= metrics["inst_level_strict_acc"]


def test_ifeval_lm_eval_hook_shapes(ifeval_docs):
    out = ifeval.lm_eval_process_results(ifeval_docs[1000], ["no"])
    assert out["prompt_level_strict_acc"] is False
    assert len(out["inst_level_strict_acc"]) == 3
    assert ifeval.aggregate_instruction_level([[True, False], [True]]) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- FollowBench
@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("analysis...\n['YES', 'NO']", 2, (True, False)),
        ("[YES, YES, NO]", 3, (True, True, False)),
        ("first try ['NO']\nfinal: ['YES']", 1, (True,)),  # the last list counts
        ("['YES', 'NO']", 3, None),  # wrong number of judgments
        ("['MAYBE']", 1, None),
        ("no list at all", 1, None),
    ],
)
def test_parse_judgments(text, n, expected):
    assert fb.parse_judgments(text, n) == expected


def test_satisfaction_rates_hand_computed():
    judged = [
        fb.Judged("a", 1, (True,)),
        fb.Judged("a", 2, (True, True)),
        fb.Judged("a", 3, (True, False, True)),
        fb.Judged("b", 1, (False,)),
        fb.Judged("b", 2, (True, False)),
        fb.Judged("b", 3, None),  # unparsable judgment: unsatisfied
    ]
    rates = fb.satisfaction_rates(judged)
    assert rates["hsr/level_1"] == 0.5
    assert rates["ssr/level_1"] == 0.5
    assert rates["hsr/level_2"] == 0.5
    assert rates["ssr/level_2"] == 0.75
    assert rates["hsr/level_3"] == 0.0
    assert rates["ssr/level_3"] == pytest.approx((2 / 3 + 0) / 2)
    assert rates["hsr/avg"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert rates["csl"] == 1.0  # group a: levels 1-2 in a row; group b: none


def test_judge_prompt_and_seed_instructions(fixtures_dir):
    rows = json.loads((fixtures_dir / "followbench_sample.json").read_text())
    seeds = fb.seed_instructions(rows)
    level2 = next(r for r in rows if r["level"] == 2)
    prompt = fb.judge_prompt(seeds[fb.group_key(level2)], level2["instruction"], "my answer", 2)
    assert "#Initial Instruction#\n" + seeds[fb.group_key(level2)] in prompt
    assert "Python LIST with 2 elements" in prompt
    assert "my answer" in prompt
