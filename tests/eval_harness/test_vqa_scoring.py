"""VQA-family scorers against hand-computed cases, normalisation edge cases included."""

from __future__ import annotations

import pytest

from eval_harness import vqa_scoring as vs


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog", "dog"),
        ("a man", "man"),
        ("an apple", "apple"),
        ("Yes.", "yes"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Im", "im"),  # the official table's "Im" key is capitalised, so it never matches lower-cased text
        ("cat's", "cat's"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # a digit,digit comma: every punctuation mark is deleted
        ("t-shirt", "t shirt"),  # a mark not next to a space becomes a space
        ("yes, it is", "yes it is"),  # a mark next to a space is deleted
        ("hello!", "hello"),
        ("red\nand\tblue ", "red and blue"),
        ("(left)", "left"),
    ],
)
def test_official_answer_normalization(raw, normalized):
    assert vs.normalize_vqa_answer(raw) == normalized


# --------------------------------------------------------------------------- VQA accuracy
@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, 0.3),  # leave the match out: 0; leave another out: 1/3 (9 of 10 subsets) -> 0.3
        (2, 0.6),  # 2 subsets with 1/3, 8 with 2/3 -> 0.6
        (3, 0.9),  # 3 subsets with 2/3, 7 with 1 -> 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_averages_leave_one_out_subsets(matches, expected):
    humans = ["blue"] * matches + ["red"] * (10 - matches)
    assert vs.vqa_accuracy("blue", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_prediction_and_humans():
    humans = ["2"] * 3 + ["three"] * 7
    assert vs.vqa_accuracy("Two.", humans) == pytest.approx(0.9)
    assert vs.vqa_accuracy("Three", humans) == pytest.approx(1.0)
    assert vs.vqa_accuracy("the 3", humans) == pytest.approx(1.0)


def test_vizwiz_unanswerable():
    humans = ["unanswerable"] * 6 + ["blue"] * 4
    assert vs.vqa_accuracy("Unanswerable", humans) == pytest.approx(1.0)
    assert vs.vqa_accuracy("blue", humans) == pytest.approx(1.0)
    assert vs.vqa_accuracy("green", humans) == 0.0


# --------------------------------------------------------------------------- TextVQA (M4C evaluator)
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("1,000 t-shirts", "1000 t shirts"),
        ("McDonald's", "mcdonald 's"),
        ("mcdonald 's", "mcdonald 's"),
        ("What?", "what"),
        ("Two", "2"),
        ("The Coca-Cola", "coca cola"),
        ("st. louis", "st louis"),
    ],
)
def test_textvqa_answer_processor(raw, normalized):
    assert vs.normalize_textvqa_answer(raw) == normalized


def test_textvqa_uses_its_own_processor_where_vqav2_differs():
    humans = ["1000 t-shirts"] * 10
    assert vs.mean_vqa_accuracy(["1,000 t-shirts"], [humans], benchmark="textvqa") == 1.0  # audit
    assert vs.mean_vqa_accuracy(["1,000 t-shirts"], [humans], benchmark="vqav2") == 0.0  # vqaEval's rules
    assert vs.mean_textvqa_accuracy(["mcdonald's"], [["mcdonald 's"] * 10]) == 1.0  # audit: possessives
    assert vs.mean_textvqa_accuracy(["Two"], [["2"] * 2 + ["3"] * 8]) == pytest.approx(0.6)


def test_mean_vqa_accuracy_and_length_check():
    score = vs.mean_vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 9 + ["no"]])
    assert score == pytest.approx((1.0 + 0.3) / 2)
    with pytest.raises(ValueError):
        vs.mean_vqa_accuracy(["yes"], [])


# --------------------------------------------------------------------------- GQA
def test_gqa_exact_match():
    assert vs.gqa_accuracy(["Yes.", "left", "The table"], ["yes", "right", "table"]) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B. The cat", "B"),
        ("The answer is C.", "C"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("I think it's the second", "FAILED"),
        (" A ", "A"),
    ],
)
def test_scienceqa_letter_parsing(text, letter):
    assert vs.parse_scienceqa_letter(text) == letter


def test_scienceqa_scores():
    records = [
        {"prediction": "A", "answer": 0, "num_choices": 2, "has_image": True},
        {"prediction": "B", "answer": 0, "num_choices": 2, "has_image": True},
        {"prediction": "C", "answer": 2, "num_choices": 3, "has_image": False},
        {"prediction": "E", "answer": 1, "num_choices": 4, "has_image": False},  # E is not an option here
    ]
    assert vs.scienceqa_scores(records) == {"accuracy": 0.5, "img_accuracy": 0.5}


# --------------------------------------------------------------------------- POPE
def test_pope_parsing_rule():
    assert vs.parse_pope_answer("Yes, there is a dog.") == "yes"
    assert vs.parse_pope_answer("No.") == "no"
    assert vs.parse_pope_answer("There is not a cat in the image.") == "no"
    assert vs.parse_pope_answer("No, it is not there. yes") == "no"  # only the first sentence counts
    assert vs.parse_pope_answer("Nope") == "yes"  # only the words No / not / no mean no


def test_pope_scores_hand_computed():
    predictions = ["Yes, there is a dog.", "No.", "There is not a cat.", "yes", "No, it is not there. yes"]
    labels = ["yes", "no", "yes", "no", "no"]
    # predicted yes: T F F T F ; gold yes: T F T F F -> TP 1, FP 1, TN 2, FN 1
    scores = vs.pope_scores(predictions, labels)
    assert scores == pytest.approx({"accuracy": 0.6, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.4})


def test_pope_all_no_has_zero_precision_not_an_error():
    scores = vs.pope_scores(["no", "no"], ["yes", "no"])
    assert scores["precision"] == 0.0 and scores["f1"] == 0.0 and scores["accuracy"] == 0.5


# --------------------------------------------------------------------------- MMBench
def test_circular_shifts_move_the_gold_letter():
    variants = vs.circular_shifts(["a", "b", "c", "d"], "C")
    assert variants == [
        (["a", "b", "c", "d"], "C"),
        (["b", "c", "d", "a"], "B"),
        (["c", "d", "a", "b"], "A"),
        (["d", "a", "b", "c"], "D"),
    ]
    for options, gold in variants:
        assert options["ABCD".index(gold)] == "c"


# Expectations checked against VLMEvalKit's can_infer (vlmeval/utils/matching_util.py).
@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B. cat", "B"),
        ("The answer is (B).", "B"),
        ("The correct answer is **C**. Because birds fly.", "C"),
        ("cat", "B"),  # the option text alone
        ("I think it is a cat", "B"),
        ("A or B", None),
        ("", None),
        ("Cannot determine the answer", "Z"),  # audit: a refusal, not option B ("no" is inside "cannot")
        ("I can't process this file.", "Z"),
        ("Z", "Z"),
        ("B2", None),  # audit: not a standalone letter
        ("'B'", None),  # audit: quotes do not separate words
        ("Option-B", None),  # audit
        ("A's", None),  # audit
        ("B because it purrs and meows a lot", None),  # the letter is not among the last four words
        ("answer is b", "B"),  # VLMEvalKit's "answer is X" pattern ignores case
        ("The answer is b.", "B"),
        ("The answer is cat", "B"),  # the option text, not the "c" of "cat" read as option C
        ("The answer is a bird", "C"),  # the article "a" is not option A
        ("The answer is B-cell", None),  # a letter inside a word names no option
    ],
)
def test_mmbench_letter_matching(text, expected):
    assert vs.parse_mmbench_letter(text, ["dog", "cat", "bird"]) == expected


@pytest.mark.parametrize("options,_", vs.circular_shifts(["apple tree", "birch", "cedar", "dogwood"], "A"))
@pytest.mark.parametrize("template", ["The answer is {}", "The answer is {}.", "The correct answer is **{}**"])
def test_mmbench_answer_is_an_option_text_starting_with_a_letter(options, _, template):
    """Option texts that start with each of the letters A-D, in every circular order: "the answer is <text>"
    picks the option whose text it is, never the option its first letter names."""
    for letter, text in zip("ABCD", options, strict=True):
        assert vs.parse_mmbench_letter(template.format(text), options) == letter, (template, text, options)
        assert vs.parse_mmbench_letter(template.format(text.capitalize()), options) == letter


def test_mmbench_refusal_is_never_right():
    records = [{"question_id": 1, "prediction": vs.parse_mmbench_letter("Cannot determine the answer", ["x", "y"]),
                "answer": "B"}]
    assert vs.mmbench_circular_scores(records)["circular_accuracy"] == 0.0


def test_mmbench_circular_accuracy_needs_every_pass_right():
    records = []
    for _options, gold in vs.circular_shifts(["x", "y", "z", "w"], "B"):
        records.append({"question_id": 1, "prediction": gold, "answer": gold, "category": "ocr"})
    for shift, (_options, gold) in enumerate(vs.circular_shifts(["p", "q", "r", "s"], "A")):
        prediction = gold if shift != 2 else "D"
        records.append({"question_id": 2, "prediction": prediction, "answer": gold, "category": "logic"})
    scores = vs.mmbench_circular_scores(records)
    assert scores["circular_accuracy"] == 0.5
    assert scores["vanilla_accuracy"] == pytest.approx(7 / 8)
    assert scores["circular_accuracy/ocr"] == 1.0
    assert scores["circular_accuracy/logic"] == 0.0
