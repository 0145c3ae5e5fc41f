"""No scorer hangs or raises on any model output: random strings and pathological LaTeX, each call timed."""

from __future__ import annotations

import random
import signal
import string
import time
from contextlib import contextmanager

import pytest

from eval_harness import followbench as fb
from eval_harness import followbench_rules as rules
from eval_harness import math_grading as mg
from eval_harness import vqa_scoring as vs

SEED = 20240613
CALL_LIMIT_S = 2.0  # far above what any of these takes on a busy machine (milliseconds)

PATHOLOGICAL = [
    "9^{9^{9}}",
    "9^{9^{9^{9}}}",
    "10^{10^{10}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "e^{10^{10}}",
    "10^{100000}",
    "9" * 5000,
    "-" + "9" * 400,
    "\\frac{" * 60,
    "}" * 200 + "{" * 200,
    "\\sqrt" * 100,
    "\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{2}}}}}^{1000}",
    "\\begin{pmatrix}" * 30,
    "\\boxed{\\boxed{\\boxed{",
    "\\boxed ",
    "\\frac{1}{0}",
    "0^{-1}",
    "\\infty - \\infty",
    "(((((((((((((((((((((((((((((((1",
    "x^{x^{x^{x^{x}}}}",
    "100000!",
    "\\text{ a}\\text{ b}\\text{ c}",
    "7/00",
    "1/0/0",
    "\\left(\\right.",
    "$" * 100,
    "The answer is: " * 50,
    "\x00\x01\x02",
    "ℵ₀ ⅓ ½ ٣/٤ 𝟙",
]
LATEX_PIECES = ["\\frac", "\\sqrt", "\\boxed", "{", "}", "^", "_", "\\left(", "\\right)", "\\pi", "\\text{ ", "=", ",",
                "\\\\", "\\dfrac", "$", ".", "/", "\\%", "\\circ", "\\infty", "x", "9", "0", " ", "\n",
                "The answer is: "]  # fmt: skip


def _random_outputs(count: int) -> list[str]:
    rng = random.Random(SEED)
    alphabet = string.printable + "éß漢字½²√∞→—“”"
    outputs = []
    for i in range(count):
        if i % 2:
            outputs.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))))
        else:
            outputs.append("".join(rng.choice(LATEX_PIECES) for _ in range(rng.randint(0, 30))))
    return outputs


@contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the (main) test thread if the block runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"a scorer ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


OUTPUTS = PATHOLOGICAL + _random_outputs(600)
MMBENCH_OPTIONS = ["dog", "cat", "a red car", "B"]
RULE_ROWS = [
    {"category": "example", "level": 1, "target": "{instruction}\n{{'AI assistant': '{answer}'}}"},
    {"category": "content", "level": 2, "source": "E2E", "target": "name[The Phoenix]"},
    {"category": "content", "level": 1, "source": "CONLL2003", "target": "['Britain', 'Bonn']"},
    {"category": "content", "level": 3, "source": "WIKIEVENTS", "target": "a\nb"},
    {"category": "situation", "level": 1, "source": "BBH_logical", "target": "(A)"},
    {"category": "situation", "level": 1, "source": "BBH_time", "target": "12/25/1937"},
    {"category": "situation", "level": 1, "source": "gsm_8k", "target": "$12"},
    {"category": "situation", "level": 1, "source": "self_made_space", "target": "14th floor"},
    *({"category": "mixed", "level": 5, "source": s, "target": ""}
      for s in ("cnn_dailymail", "xsum", "samsum", "gigaword", "arxiv", "text_editing")),
    *({"category": "format", "level": level, "example_id": i} for i in (22, 30) for level in (1, 5)),
]  # fmt: skip


def _score_everything_fast(output: str) -> None:
    mg.gsm8k_is_correct(mg.extract_gsm8k_answer(output), "18")
    mg.gsm8k_is_correct(mg.extract_gsm8k_answer_flexible(output), "18")
    mg.gsm8k_is_correct(mg.extract_gsm8k_answer("The answer is: " + output), "18")
    answers = (mg.extract_math_answer(output), mg.extract_math_answer_flexible(output), mg.math_gold_answer(output))
    for answer in answers:
        mg.is_math_equiv(answer, "\\frac{1}{2}")
        mg.is_math_equiv(output, answer)
    vs.vqa_accuracy(output, ["1000 t-shirts"] * 5 + [output] * 5, vs.normalize_textvqa_answer)
    vs.vqa_accuracy(output, ["yes"] * 10)
    assert vs.parse_mmbench_letter(output, MMBENCH_OPTIONS) in (None, "Z", "A", "B", "C", "D")
    for level in (1, 3):
        verdicts = fb.parse_judgments(output, level)
        assert verdicts is None or len(verdicts) == level
    for row in RULE_ROWS:
        assert rules.rule_satisfied(row, output) in (True, False)


def test_fast_scorers_never_hang_or_raise_on_model_output():
    for output in OUTPUTS:
        with _time_limit(CALL_LIMIT_S):
            _score_everything_fast(output)


def test_lm_eval_hooks_never_hang_or_raise():
    from eval_harness.tasks.math import utils

    for output in PATHOLOGICAL + _random_outputs(60):
        with _time_limit(CALL_LIMIT_S):
            scores = utils.process_results_gsm8k({"gold": "18"}, [output])
        assert set(scores.values()) <= {True, False}


@pytest.mark.parametrize("output", PATHOLOGICAL[:6] + _random_outputs(4))
def test_lenient_math_score_stops_at_its_time_limit(output):
    started = time.monotonic()
    answer = mg.extract_math_answer_flexible("The answer is: " + output)
    assert mg.is_math_equiv_flex(answer, "9^{9^{9}}", time_limit_s=1.0) in (True, False)
    assert time.monotonic() - started < 15  # the limit, plus a restart of the math-verify worker if it was cut off
