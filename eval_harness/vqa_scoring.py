"""Scorers for the LLaVA visual benchmarks, as pure functions following each benchmark's official rules.

- VQAv2 / VizWiz: the VQA accuracy ``min(#humans who gave the answer / 3, 1)``, averaged over the 10
  leave-one-annotator-out subsets of the 10 human answers, after the answer normalisation of the VQA
  evaluation script (``vqaEval.py``): punctuation rules, lower case, number words to digits, articles
  dropped, contractions restored.
- TextVQA: the same accuracy computed as LLaVA's ``eval_textvqa.py`` does, with the TextVQA (M4C) evaluator's
  own answer processor (``EvalAIAnswerProcessor`` in ``m4c_evaluator.py``): before the rules above it lower-cases,
  deletes every ``,`` and ``?`` and splits possessives (``mcdonald's`` -> ``mcdonald 's``), so
  ``1,000 t-shirts`` matches ``1000 t-shirts``.
- GQA: exact match after LLaVA's conversion (trailing period removed, lower case).
- ScienceQA: LLaVA's ``eval_science_qa.py`` letter parsing; accuracy over all and over image questions.
- POPE: LLaVA's ``eval_pope.py`` yes/no parsing; accuracy, precision, recall, F1 and yes-ratio.
- MMBench: the option a response picks by VLMEvalKit's ``can_infer`` rules (``vlmeval/utils/matching_util.py``:
  refusal phrases give ``Z``, a lone option letter among the last four words, the "answer is X" pattern, else
  exactly one option text), scored by circular evaluation: a question counts only if every circular shift of
  its options is answered correctly. This is VLMEvalKit's exact-matching mode; responses it cannot match
  score 0 (VLMEvalKit would ask an LLM to match those when one is configured).

Deliberate deviations: TextVQA accepts any number of human answers (the M4C evaluator asserts exactly 10,
which every TextVQA question has); ``can_infer``'s extra "A may be a quantifier" check, which VLMEvalKit runs
only when the ``VERBOSE`` environment variable is set, is left out (its default behaviour is reproduced).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

# --------------------------------------------------------------------------- VQA answer normalisation
# The tables below are those of the official VQA evaluation script (vqaEval.py), quirks included: the
# "Id've"/"Im"/"Ive" keys carry a capital I and so never match lower-cased text, and "somebody'd" maps to
# "somebodyd".
# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# fmt: on
# The official pattern: "(?!<=\d)" is (by a typo there) a look-AHEAD, so this strips every period that is not
# followed by a digit; "3.5" keeps its point, "3." and "dr." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (= 32) as the `count` argument of sub(): at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official punctuation rule: a mark next to a space (or any text with a digit,digit comma) is deleted,
    otherwise replaced by a space; then periods not followed by a digit go."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lower case; number words -> digits; articles dropped; contractions restored (official rule)."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """The official answer normalisation: newlines/tabs to spaces, strip, punctuation, then digits/articles.

    The official script applies it to the prediction and the human answers of a question whose humans
    disagree; it is applied here to every answer, as LLaVA's submission step (EvalAI's answer processor) and
    TextVQA's evaluator do, so that "Yes." matches a unanimous "yes".
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_textvqa_answer(answer: str) -> str:
    """The TextVQA (M4C / EvalAI) answer processor: lower case, ``,`` and ``?`` deleted, ``'s`` split off,
    then the VQA rules (with every comma gone, the digit-comma case of the punctuation rule never applies)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def vqa_accuracy(
    prediction: str, human_answers: Sequence[str], normalize: Callable[[str], str] = normalize_vqa_answer
) -> float:
    """VQA accuracy of one prediction: ``min(#matching humans / 3, 1)`` averaged over the leave-one-out subsets."""
    if not human_answers:
        raise ValueError("VQA accuracy needs the human answers of the question")
    predicted = normalize(prediction)
    humans = [normalize(a) for a in human_answers]
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3.0))
    return sum(scores) / len(scores)


def mean_vqa_accuracy(
    predictions: Sequence[str], human_answers: Sequence[Sequence[str]], benchmark: str = "vqav2"
) -> float:
    """Benchmark score in [0, 1]: the mean VQA accuracy, with TextVQA's own answer processor for ``textvqa``."""
    _same_length(predictions, human_answers)
    normalize = normalize_textvqa_answer if benchmark == "textvqa" else normalize_vqa_answer
    return _mean([vqa_accuracy(p, a, normalize) for p, a in zip(predictions, human_answers, strict=True)])


def mean_textvqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """TextVQA's score in [0, 1], as LLaVA's ``eval_textvqa.py`` computes it."""
    return mean_vqa_accuracy(predictions, human_answers, benchmark="textvqa")


# --------------------------------------------------------------------------- GQA


def normalize_gqa_answer(answer: str) -> str:
    """LLaVA's GQA conversion: trailing periods removed, lower case (and surrounding spaces)."""
    return answer.strip().rstrip(".").lower().strip()


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """GQA accuracy: exact match of the normalised prediction with the gold answer."""
    _same_length(predictions, answers)
    return _mean([normalize_gqa_answer(p) == a.strip().lower() for p, a in zip(predictions, answers, strict=True)])


# --------------------------------------------------------------------------- ScienceQA

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str, options: Sequence[str] = SCIENCEQA_OPTIONS) -> str:
    """LLaVA's parsing: a bare letter, "B. text", or exactly one "The answer is X."; else "FAILED"."""
    text = text.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _SCIENCEQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_is_correct(prediction: str, answer_index: int, num_choices: int) -> bool:
    """Whether the parsed letter is the gold option (a letter beyond the question's choices is wrong)."""
    letter = parse_scienceqa_letter(prediction)
    options = SCIENCEQA_OPTIONS[:num_choices]
    return letter in options and options.index(letter) == answer_index


def scienceqa_scores(records: Iterable[dict]) -> dict[str, float]:
    """``accuracy`` over all questions and ``img_accuracy`` over those with an image (LLaVA reports the latter).

    Each record: ``prediction``, ``answer`` (gold index), ``num_choices``, optional ``has_image``.
    """
    correct_all, correct_img = [], []
    for record in records:
        ok = scienceqa_is_correct(record["prediction"], int(record["answer"]), int(record["num_choices"]))
        correct_all.append(ok)
        if record.get("has_image"):
            correct_img.append(ok)
    scores = {"accuracy": _mean(correct_all)}
    if correct_img:
        scores["img_accuracy"] = _mean(correct_img)
    return scores


# --------------------------------------------------------------------------- POPE


def parse_pope_answer(text: str) -> str:
    """LLaVA's rule: first sentence, commas removed; "no" if it has the word No/not/no, else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` is the positive class) and the ratio of ``yes`` answers."""
    _same_length(predictions, labels)
    predicted = [parse_pope_answer(p) == "yes" for p in predictions]
    gold = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(predicted, gold, strict=True))
    fp = sum(p and not g for p, g in zip(predicted, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(predicted, gold, strict=True))
    fn = sum(not p and g for p, g in zip(predicted, gold, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(gold) if gold else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(predicted) / len(predicted) if predicted else 0.0,
    }


# --------------------------------------------------------------------------- MMBench

MMBENCH_LETTERS = ("A", "B", "C", "D", "E", "F")


def circular_shifts(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """The circular variants of a question: options rotated by 0..n-1 places, with the gold letter moved along."""
    letters = MMBENCH_LETTERS[: len(options)]
    gold_index = letters.index(answer)
    variants = []
    for shift in range(len(options)):
        rotated = list(options[shift:]) + list(options[:shift])
        variants.append((rotated, letters[(gold_index - shift) % len(options)]))
    return variants


# VLMEvalKit's can_infer_option: these phrases are a refusal (option "Z", never right); these characters
# separate words before the option letters are looked for; "answer is X" is its pattern for verbose answers.
MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_WORD_SEPARATORS = str.maketrans({char: " " for char in ".()[],:;!*#{}"})
# The letter must stand alone: "answer is cat" names no letter (the "c" of "cat" is not option C). A lower-case
# letter counts only where it ends the response ("answer is b."), so that the article of "answer is a dog" does not.
_ANSWER_IS_LETTER = re.compile(
    r"(?i:(?:correct\s+)?answer\s+is)\s+\**\(?(?:([ABCD])|([abcd])(?=[)*\s.!]*$))\)?\**(?![\w'-])"
)
REFUSAL = "Z"


def _letter_from_words(response: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: a refusal gives "Z"; else the one option letter standing as a word
    among the last four words; else "Z" as a word when no letter is; else the "answer is X" pattern."""
    if _API_FAILURE in response:
        return None
    if any(phrase in response for phrase in MMBENCH_REFUSALS):
        return REFUSAL
    words = response.translate(_WORD_SEPARATORS).split()
    named = [letter for letter in choices if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and REFUSAL in words:
        return REFUSAL
    match = _ANSWER_IS_LETTER.search(response)
    letter = (match.group(1) or match.group(2)).upper() if match else None
    return letter if letter in choices else None


def _letter_from_option_text(response: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose text the (not too long) response contains."""
    lowered = response.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    contained = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return contained[0] if len(contained) == 1 else None


def parse_mmbench_letter(text: str, options: Sequence[str]) -> str | None:
    """The option a response picks, by VLMEvalKit's ``can_infer``: a letter, "Z" for a refusal, or None."""
    choices = dict(zip(MMBENCH_LETTERS, (str(option) for option in options), strict=False))
    response = str(text)
    return _letter_from_words(response, choices) or _letter_from_option_text(response, choices)


def mmbench_circular_scores(records: Iterable[dict]) -> dict[str, float]:
    """Circular accuracy: a question (``question_id``) scores only if ALL its circular passes are right.

    Each record: ``question_id`` (shared by the passes of one question), ``prediction`` (a letter or None),
    ``answer`` (gold letter), optional ``category``. Also gives the plain per-pass ``vanilla_accuracy`` and a
    circular accuracy per category.
    """
    passes: dict[str, list[bool]] = defaultdict(list)
    category_of: dict[str, str] = {}
    for record in records:
        key = str(record["question_id"])
        passes[key].append(record.get("prediction") == record["answer"])
        if record.get("category"):
            category_of[key] = str(record["category"])
    if not passes:
        return {"circular_accuracy": 0.0, "vanilla_accuracy": 0.0}
    circular = {key: all(results) for key, results in passes.items()}
    scores = {
        "circular_accuracy": _mean(list(circular.values())),
        "vanilla_accuracy": _mean([r for results in passes.values() for r in results]),
    }
    by_category: dict[str, list[bool]] = defaultdict(list)
    for key, ok in circular.items():
        if key in category_of:
            by_category[category_of[key]].append(ok)
    for category, oks in sorted(by_category.items()):
        scores[f"circular_accuracy/{category}"] = _mean(oks)
    return scores


# --------------------------------------------------------------------------- helpers


def _mean(values: Sequence[bool | float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
