"""GSM8K / MATH answer extraction and equivalence (MetaMath's protocol, math-verify for the lenient score)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from eval_harness import math_grading as mg

MATH_TEST_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "math" / "math_test.jsonl"


@pytest.fixture(scope="module")
def math_test_rows():
    if not MATH_TEST_FILE.is_file():
        pytest.skip(f"the shared MATH test set is not at {MATH_TEST_FILE}")
    return [json.loads(line) for line in MATH_TEST_FILE.read_text(encoding="utf-8").splitlines()]


def _gsm8k_rows(path, n=40):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _metamath_style(reference_answer: str) -> str:
    """A MetaMath-style response built from a real GSM8K solution: calculator marks dropped, final line
    rewritten as "The answer is: X"."""
    body, final = reference_answer.split("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is: {final.strip()}"


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_gold_is_the_integer_after_the_hashes_on_the_real_test_set(gsm8k_test_file):
    rows = _gsm8k_rows(gsm8k_test_file)
    golds = [mg.gsm8k_gold_answer(r["answer"]) for r in rows]
    assert golds[0] == "18"  # Janet's ducks
    assert all(re.fullmatch(r"-?\d+", g) for g in golds)


def test_metamath_extraction_recovers_every_real_gold_answer(gsm8k_test_file):
    rows = _gsm8k_rows(gsm8k_test_file)
    for row in rows:
        gold = mg.gsm8k_gold_answer(row["answer"])
        prediction = mg.extract_gsm8k_answer(_metamath_style(row["answer"]))
        assert mg.gsm8k_is_correct(prediction, gold), (row["answer"], prediction)


def test_reference_solution_without_marker_fails_strict_but_passes_flexible(gsm8k_test_file):
    row = _gsm8k_rows(gsm8k_test_file, 1)[0]
    gold = mg.gsm8k_gold_answer(row["answer"])
    assert mg.extract_gsm8k_answer(row["answer"]) is None
    assert not mg.gsm8k_is_correct(mg.extract_gsm8k_answer(row["answer"]), gold)
    assert mg.gsm8k_is_correct(mg.extract_gsm8k_answer_flexible(row["answer"]), gold)


def test_a_wrong_final_answer_is_wrong(gsm8k_test_file):
    row = _gsm8k_rows(gsm8k_test_file, 1)[0]
    gold = mg.gsm8k_gold_answer(row["answer"])
    wrong = _metamath_style(row["answer"]).replace(f"The answer is: {gold}", f"The answer is: {int(gold) + 1}")
    assert not mg.gsm8k_is_correct(mg.extract_gsm8k_answer(wrong), gold)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She makes 9 * 2 = $18 every day.\nThe answer is: 18", 18),
        ("The answer is: $18.", 18),
        ("The answer is: 1,234 dollars", 1234),
        ("The answer is: -7", -7),
        ("First guess. The answer is: 5\nWait, recount. The answer is: 6", 6),  # the LAST marker counts
        ("The answer is: 10/4", 2),  # MetaMath reads a/b as a fraction and rounds (2.5 -> 2, banker's rounding)
        ("The answer is: 7/0", 7),  # a zero denominator gives the numerator
        ("The answer is: 7/00", None),  # MetaMath raises ZeroDivisionError here; unparsable scores 0
        ("The answer is: -" + "9" * 400, None),  # MetaMath raises OverflowError in round()
        ("The answer is: " + "9" * 400 + "/3", None),  # too large for a float
        ("The answer is: /5", None),  # no numerator
        ("The answer is: 18.0", 18),
        ("So the total is 18.", None),  # no marker
        ("The answer is: eighteen", None),  # no number after the marker
    ],
)
def test_metamath_number_extraction(completion, expected):
    assert mg.extract_gsm8k_answer(completion) == expected


def test_flexible_extraction_takes_the_last_number():
    assert mg.extract_gsm8k_answer_flexible("She has 3 apples, then 12,000 more.") == 12000.0
    assert mg.extract_gsm8k_answer_flexible("no digits here") is None


# --------------------------------------------------------------------------- MATH


def _math_rows(fixtures_dir):
    return [json.loads(line) for line in (fixtures_dir / "math_test.jsonl").read_text().splitlines()]


def test_gold_answers_are_the_last_boxed_content_of_real_solutions(fixtures_dir):
    golds = [mg.math_gold_answer(r["solution"]) for r in _math_rows(fixtures_dir)]
    assert golds == ["2", "10", "20\\sqrt3", "125"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("\\fbox{5}", None),  # found, but lm-eval's and MetaMath's remove_boxed only read \\boxed
        ("answer $\\boxed 7$", "7"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_boxed_extraction(text, expected):
    assert mg.remove_boxed(mg.last_boxed_only_string(text)) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The distance is 20 sqrt 3.\nThe answer is: 20\\sqrt{3}", "20\\sqrt{3}"),
        ("... so we get 1/2.\nThe answer is: \\frac{1}{2}.\n", "\\frac{1}{2}"),
        ("The answer is: 5.\nThis is because...", "5"),
        ("The answer is: (1,-2)", "(1,-2)"),
        ("Therefore the answer is $\\boxed{5}$.", None),  # no MetaMath marker
    ],
)
def test_metamath_math_extraction(completion, expected):
    assert mg.extract_math_answer(completion) == expected


def test_flexible_math_extraction_falls_back_to_the_last_box():
    assert mg.extract_math_answer_flexible("Therefore the answer is $\\boxed{5}$.") == "5"
    assert mg.extract_math_answer_flexible("The answer is: $\\boxed{\\frac{3}{4}}$") == "\\frac{3}{4}"


# Hendrycks' is_equiv (MetaMath / lm-eval): string equality after strip_string, nothing more.
STRICT_EQUAL = [
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("20\\sqrt{3}", "20\\sqrt3"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("10\\text{ inches}", "10"),
    ("5\\text{ m/s}", "5"),  # audit: any "\\text{ " suffix is a unit
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$18.90", "18.90"),
    ("50\\%", "50"),
    ("x = 5", "5"),
    ("k = 7", "7"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),  # audit
    ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
    (" 3 ", "3"),
]

# Different for Hendrycks; math-verify (the lenient score) finds them equal.
FLEX_ONLY_EQUAL = [
    ("0.25", "\\frac14"),
    ("\\frac{-1}{2}", "-\\frac{1}{2}"),
    ("(0.5, 2)", "\\left(\\frac12, 2\\right)"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("1,000", "1000"),
    ("2, -3", "-3, 2"),
    ("2x+1", "1+2x"),
    ("\\frac{2}{4}", "\\frac12"),
    ("0.333333", "\\frac13"),  # math-verify's own numeric rounding; never in the strict score
]

# Different under both.
DIFFERENT = [
    ("1000001", "1000000"),  # audit: no relative tolerance
    ("5 pi", "5"),  # audit: a trailing word is not dropped as a unit
    ("5\\pi", "5"),
    ("9^{9^{9}}", "1"),  # audit: must not hang
    ("\\frac{1}{3}", "0.33"),
    ("(1,2)", "(2,1)"),
    ("[1,2]", "(1,2)"),
    ("2", "3"),
    ("\\sqrt{2}", "2"),
    ("-5", "5"),
    ("12 dollars", "12"),
]


@pytest.mark.parametrize("prediction, gold", STRICT_EQUAL)
def test_hendrycks_equal_answers(prediction, gold):
    assert mg.is_math_equiv(prediction, gold)
    assert mg.is_math_equiv(gold, prediction)
    assert mg.is_math_equiv_flex(prediction, gold)


@pytest.mark.parametrize("prediction, gold", FLEX_ONLY_EQUAL)
def test_only_the_lenient_score_accepts(prediction, gold):
    assert not mg.is_math_equiv(prediction, gold)
    assert mg.is_math_equiv_flex(prediction, gold)


@pytest.mark.parametrize("prediction, gold", DIFFERENT)
def test_different_answers(prediction, gold):
    assert not mg.is_math_equiv(prediction, gold)
    assert not mg.is_math_equiv_flex(prediction, gold, time_limit_s=2.0)


def test_a_missing_answer_never_matches():
    for equiv in (mg.is_math_equiv, mg.is_math_equiv_flex):
        assert not equiv(None, "1")
        assert not equiv("1", None)
        assert not equiv(None, None)  # the official helper says True here; MetaMath never gets that far


def test_power_tower_is_cut_off_by_the_time_limit_in_a_worker_thread():
    outcome = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: outcome.append(mg.is_math_equiv_flex("9^{9^{9}}", "7", time_limit_s=1.0)))
    worker.start()
    worker.join(timeout=30)
    assert outcome == [False]
    assert time.monotonic() - started < 15  # the limit plus a worker restart, on a busy machine
    assert mg.is_math_equiv_flex("3\\sqrt{2}", "\\sqrt{18}")  # the worker comes back for the next comparison


def test_real_gold_answers_survive_metamath_re_extraction(math_test_rows):
    """Every gold answer, written as MetaMath's final line, is equal to itself under the strict score, except
    the one gold that ends with a period: MetaMath strips the answer's final period, not the gold's."""
    failures = []
    for row in math_test_rows:
        gold = mg.math_gold_answer(row["solution"])
        completion = row["solution"] + "\nThe answer is: " + gold
        if not mg.is_math_equiv(mg.extract_math_answer(completion), gold):
            failures.append(gold)
    assert failures == ["\\frac{7}{5} + \\frac{1}{5} i."]


def test_real_gold_answers_match_their_boxed_solution_under_the_lenient_score(math_test_rows):
    for row in math_test_rows[::25]:  # 200 problems across all subjects
        gold = mg.math_gold_answer(row["solution"])
        assert gold is not None
        assert mg.is_math_equiv_flex(mg.extract_math_answer_flexible(row["solution"]), gold), gold


def test_lm_eval_hooks_score_without_raising():
    from eval_harness.tasks.math import utils

    gsm8k = utils.process_results_gsm8k({"gold": "7"}, ["The answer is: 7/00"])
    assert gsm8k == {"exact_match": False, "exact_match_flex": False}
    math_scores = utils.process_results_math({"gold": "\\frac{1}{4}"}, ["So.\nThe answer is: 0.25"])
    assert math_scores == {"exact_match": False, "exact_match_flex": True}


# --------------------------------------------------------------------------- \fbox{} in the lenient score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\fbox{42}", "42"),
        ("so $\\fbox{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1}, finally \\fbox{2}", "2"),  # the last box, whichever command
        ("first \\fbox{1}, finally \\boxed{2}", "2"),
        ("answer $\\boxed 7$", "7"),
        ("\\fbox{unbalanced", None),
        ("no box here", None),
    ],
)
def test_last_box_content_reads_fbox_too(text, expected):
    assert mg.last_box_content(text) == expected


def test_fbox_answers_count_in_exact_match_flex_on_the_gsm8k_and_math_paths():
    from eval_harness.tasks.math import utils

    # The number in the box wins over the last number of the response (7).
    gsm8k = utils.process_results_gsm8k({"gold": "42"}, ["She pays \\fbox{42} dollars (6 times 7)."])
    assert gsm8k == {"exact_match": False, "exact_match_flex": True}
    assert mg.extract_gsm8k_answer_flexible("Total: \\fbox{1,200} after 3 weeks") == 1200.0
    math_scores = utils.process_results_math({"gold": "\\frac{1}{2}"}, ["Hence $\\fbox{\\frac{1}{2}}$."])
    assert math_scores == {"exact_match": False, "exact_match_flex": True}
    with_marker = utils.process_results_math({"gold": "\\frac{3}{4}"}, ["So.\nThe answer is: $\\fbox{\\frac{3}{4}}$"])
    assert with_marker == {"exact_match": False, "exact_match_flex": True}  # MetaMath compares the raw text


def test_exact_match_stays_metamath_s_with_fbox_answers():
    """The strict score and the gold answers keep lm-eval's (= MetaMath's) helpers, which never read \\fbox{}."""
    from lm_eval.tasks.hendrycks_math.utils import is_equiv, last_boxed_only_string, remove_boxed

    from eval_harness.tasks.math import utils

    assert mg.math_gold_answer("so \\fbox{5}") is None
    assert mg.remove_boxed(mg.last_boxed_only_string("\\fbox{5}")) is None
    responses = ["The answer is: \\fbox{5}", "The answer is: 5", "\\fbox{5}", "The answer is: \\boxed{5}"]
    official = [is_equiv(r.split("The answer is: ")[-1], "5") if "The answer is: " in r else False for r in responses]
    ours = [utils.process_results_math({"gold": "5"}, [r])["exact_match"] for r in responses]
    assert ours == official == [False, True, False, False]
    gsm8k = [utils.process_results_gsm8k({"gold": "5"}, [r])["exact_match"] for r in responses]
    assert gsm8k == [True, True, False, True]  # MetaMath: the first number after the marker
    solution = "We find $x = \\boxed{\\frac{1}{2}}$, not \\fbox{3}."
    assert mg.math_gold_answer(solution) == remove_boxed(last_boxed_only_string(solution)) == "\\frac{1}{2}"
