"""The FollowBench rows that FollowBench scores by rules instead of an LLM judge, scored by those rules.

FollowBench's ``code/rule_based_evaluation.py`` checks three kinds of rows programmatically:

- the ``example`` category: the response must match the row's ``target`` template, ``{answer}`` standing for
  any text on one line (``check_match``);
- rows whose ``source`` is one of `RULE_SOURCES` (E2E, CoNLL-2003, text editing, summarisation sets with
  sentence/word counts, BBH, GSM8K, ...): a per-source check against ``target`` or of the level's
  constraints, each level adding one constraint to the previous ones;
- the ``format`` category's examples 22 and 30 (paragraph and bullet layouts).

Each check says whether the response satisfies ALL the row's constraints; FollowBench counts that one outcome
as both the hard and the soft satisfaction of the row. The rules below restate FollowBench's own, quirks
included (``count_sentences`` counts whitespace between full stops as a sentence; word counts split on single
spaces; at level 5 of format example 22 four paragraphs are required where levels 1-4 require three).
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Callable


def _rule_for(row: dict) -> Callable[[str, int], bool] | None:
    """FollowBench's rule for this row, as (response, level) -> verdict; None for a row the judge scores."""
    if row.get("category") == "example":
        return lambda response, _level: matches_template(row["target"], response)
    source = row.get("source")
    if source in RULE_SOURCES:
        return lambda response, level: _SOURCE_RULES[source](response, row.get("target", ""), level)
    if row.get("category") == "format" and _example_id(row) in RULE_FORMAT_EXAMPLES:
        return _FORMAT_RULES[_example_id(row)]
    return None


def is_rule_scored(row: dict) -> bool:
    """Whether FollowBench scores this row by rules (never by the judge)."""
    return _rule_for(row) is not None


# Sources whose rule compares the response with the row's ``target`` (the others count sentences and words).
TARGET_SOURCES = ("E2E", "text_editing", "WIKIEVENTS", "CONLL2003", "self_made_space", "BBH_logical", "BBH_time",
                  "gsm_8k")  # fmt: skip


def rule_input_problem(row: dict) -> str | None:
    """What a rule-scored row lacks for its rule to be applied (None: nothing), checked before generating."""
    if row.get("category") != "example" and row.get("source") not in TARGET_SOURCES:
        return None
    target = row.get("target")
    if not isinstance(target, str) or not target:
        rule = "the example template" if row.get("category") == "example" else f"the {row.get('source')} rule"
        return f"has no 'target', which {rule} checks the response against"
    if row.get("source") == "CONLL2003":
        try:
            ast.literal_eval(target)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return "has a 'target' that is not a Python list literal, which the CONLL2003 rule reads"
    return None


def rule_satisfied(row: dict, response: str) -> bool:
    """FollowBench's rule-based verdict for one response to a rule-scored row (see `is_rule_scored`)."""
    level = int(row["level"])
    rule = _rule_for(row)
    if rule is None:
        raise ValueError(f"FollowBench row {row.get('category')}/{row.get('example_id')} is scored by the judge")
    return bool(rule(response, level))


def _example_id(row: dict) -> int | None:
    try:
        return int(row.get("example_id"))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- example constraints


def matches_template(target: str, response: str) -> bool:
    """The response has the template's shape: literal text around ``{answer}`` (any text within one line)."""
    template = target.replace("{instruction}\n", "").replace("{{", "{").replace("}}", "}")
    pattern = re.escape(template.replace("{answer}", ".*")).replace("\\.\\*", ".*")
    return re.fullmatch(pattern, response) is not None


# --------------------------------------------------------------------------- text measures


def _sentences(text: str) -> list[str]:
    return [piece for piece in re.split(r"[.!?]", text) if piece]


def _has_word(text: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", text) is not None


def _space_words(text: str) -> int:
    return len(text.split(" "))


def _all_sentences_shorter_than(text: str, words: int) -> bool:
    return all(len(sentence.split()) < words for sentence in _sentences(text))


def _all_sentences_longer_than(text: str, words: int) -> bool:
    return all(len(sentence.split()) > words for sentence in _sentences(text))


def _nth_sentence(text: str, n: int) -> str | None:
    sentences = _sentences(text)
    return sentences[n - 1] if len(sentences) >= n else None


def _nth_sentence_has_word(text: str, n: int, word: str) -> bool:
    sentence = _nth_sentence(text, n)
    return sentence is not None and _has_word(sentence, word)


def _nth_sentence_present_perfect(text: str, n: int) -> bool:
    sentence = _nth_sentence(text, n)
    return sentence is not None and re.search(r"\b(has|have)\s+\w+", sentence) is not None


def _present_continuous(text: str) -> bool:
    return re.search(r"\b(am|is|are)\s+\w+ing\b", text) is not None


def _punctuation_count(text: str) -> int:
    return sum(char in string.punctuation for char in text)


def _cumulative(*checks: Callable[[str], bool]) -> Callable[[str, str, int], bool]:
    """A source whose level n adds its n-th check to those of the levels below."""
    return lambda response, _target, level: all(check(response) for check in checks[:level])


def _last_match_equals(pattern: str) -> Callable[[str, str, int], bool]:
    def rule(response: str, target: str, _level: int) -> bool:
        found = re.findall(pattern, response)
        return bool(found) and found[-1] == target

    return rule


def _lines_within_target(response: str, target: str, _level: int) -> bool:
    allowed = target.split("\n")
    return all(line in allowed for line in response.split("\n"))


_SOURCE_RULES: dict[str, Callable[[str, str, int], bool]] = {
    "E2E": lambda response, target, _level: response == target,
    "text_editing": lambda response, target, _level: response == target,
    "WIKIEVENTS": _lines_within_target,
    "CONLL2003": lambda response, target, _level: response in ast.literal_eval(target),
    "self_made_space": lambda response, target, _level: target in response,
    "BBH_logical": _last_match_equals(r"\([A-Z]\)"),
    "BBH_time": _last_match_equals(r"\d{2}/\d{2}/\d{4}"),
    "gsm_8k": _last_match_equals(r"\$\d+"),
    "cnn_dailymail": _cumulative(
        lambda r: len(_sentences(r)) == 3,
        lambda r: _all_sentences_shorter_than(r, 15),
        lambda r: all(_nth_sentence_has_word(r, n, w) for n, w in ((1, "Potter"), (2, "actor"), (3, "films"))),
        lambda r: not _nth_sentence_has_word(r, 2, "lavish"),
        lambda r: _nth_sentence_present_perfect(r, 3),
    ),
    "xsum": _cumulative(
        lambda r: len(_sentences(r)) == 1,
        lambda r: _space_words(r) < 20,
        lambda r: not _has_word(r, "Newton Stewart"),
        _present_continuous,
        lambda r: _has_word(r, "operation"),
    ),
    "samsum": _cumulative(
        lambda r: len(_sentences(r)) == 1,
        lambda r: _space_words(r) < 15,
        lambda r: _has_word(r, "stuff"),
        lambda r: re.search(r"procrast", r, re.IGNORECASE) is None,
        lambda r: _punctuation_count(r) == 1,
    ),
    "gigaword": _cumulative(
        lambda r: _space_words(r) == 8,
        lambda r: _punctuation_count(r) == 0,
        str.islower,
        lambda r: not _has_word(r, "bus"),
        lambda r: _has_word(r, "in"),
    ),
    "arxiv": _cumulative(
        lambda r: len(_sentences(r)) == 1,
        lambda r: _space_words(r) <= 20,
        lambda r: r[:2] == "We",
        lambda r: _has_word(r, "activations"),
        lambda r: not _has_word(r, "transformer"),
    ),
}
RULE_SOURCES = tuple(_SOURCE_RULES)


# --------------------------------------------------------------------------- format examples 22 and 30


def _paragraphs_numbered(text: str) -> bool:
    paragraphs = (paragraph.lstrip() for paragraph in text.split("\n\n"))
    return all(re.match(r"\d+\.", paragraph) for paragraph in paragraphs if paragraph)


def _format_22(response: str, level: int) -> bool:
    paragraphs = response.split("\n\n")
    if len(paragraphs) != (4 if level >= 5 else 3):
        return False
    checks = (
        lambda: all(len(_sentences(paragraph)) < 3 for paragraph in paragraphs[:3]),
        lambda: _all_sentences_longer_than(response, 20),
        lambda: _paragraphs_numbered(response),
        lambda: response.endswith("Those are suggestions"),
    )
    return all(check() for check in checks[: level - 1])


_FORMAT_30_SENTENCE_END = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")


def _format_30(response: str, level: int) -> bool:
    sentences = _FORMAT_30_SENTENCE_END.split(response)
    numbered = [s for s in sentences if any(f"{n}." in s for n in range(1, 6))]
    checks = (
        lambda: "**" in response,
        lambda: len(re.findall(r"\*\*[\d].+?:", response)) == 5,
        lambda: all(len(s.split(".")) < 3 for s in numbered),
        lambda: all(10 <= len(s.split()) <= 15 for s in sentences),
        lambda: not any(word.endswith("-ly") for s in sentences for word in s.split()),
    )
    return all(check() for check in checks[:level])


_FORMAT_RULES: dict[int, Callable[[str, int], bool]] = {22: _format_22, 30: _format_30}
RULE_FORMAT_EXAMPLES = tuple(_FORMAT_RULES)
