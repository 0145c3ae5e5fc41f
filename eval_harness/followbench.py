"""FollowBench scoring as FollowBench's own scripts do it: judge prompts, judgment parsing, rules, HSR/SSR/CSL.

FollowBench builds, for each seed instruction (level 0), variants with 1..5 added constraints (levels 1-5).
For a response at level n, each of its n constraints is satisfied or not:

- rows FollowBench checks by rules (the ``example`` category, rule-checkable sources, two ``format``
  examples) get one verdict from `eval_harness.followbench_rules`, counted as their hard and soft satisfaction;
- every other row goes to an LLM judge with FollowBench's prompt for its category (``content``,
  ``situation``, ``style``, ``format``, ``mixed``: ``code/gpt4_based_evaluation.py``), which lists the
  instruction at every level up to n; `parse_judgments` reads the judgment as FollowBench's
  ``paring_discriminative_generation`` does: only the LAST line counts; at level 1 it is satisfied if that
  line contains ``YES``, else unsatisfied if it contains ``NO``; at level n > 1 the line's ``[...]`` list
  must have n entries, ``YES`` counting as satisfied and ``NO``/``PARTIAL``/``MAYBE``/``UNKNOWN``/``N/A`` as
  unsatisfied (that constraint only).

From those: HSR (hard satisfaction rate) of a level, the share of responses with ALL constraints satisfied;
SSR (soft), the mean share of satisfied constraints; CSL (consistent satisfaction levels) of a seed, the number
of consecutive fully satisfied levels from level 1, averaged over seeds. Rates are given over all categories
(``hsr/level_k``...) and per category (``<category>/hsr/level_k``...), FollowBench's own tables.

Deliberate deviations:

- A judgment FollowBench cannot parse is logged there ("you must manually fix the evaluation") and added to
  the sums as -1. Here it is reported as needing a manual check: counted (``needs_manual_check``), flagged in
  the records, and left out of the rates it would distort (a seed's CSL is left out only if the unparsable
  level comes before its first failed level).
- The judge's list is read with ``ast.literal_eval``, never ``eval`` (judge output is not executed); a list
  that only ``eval`` could build (``['Y' + 'ES', 'NO']``) needs a manual check.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from eval_harness.errors import UsageError
from eval_harness.followbench_rules import is_rule_scored, rule_input_problem, rule_satisfied

LEVELS = (1, 2, 3, 4, 5)
DATA_FIX = "give FollowBench's data/*_constraints.json files (or rows with the same fields)"
UNSATISFIED_WORDS = ("NO", "PARTIAL", "MAYBE", "UNKNOWN", "N/A")


@dataclass(frozen=True)
class Judged:
    """One scored response: its seed group, level and one bool per constraint (None: needs a manual check)."""

    group: str
    level: int
    satisfied: tuple[bool, ...] | None

    @property
    def category(self) -> str:
        return self.group.split("/", 1)[0]


def hard_satisfied(judged: Judged) -> bool:
    return bool(judged.satisfied) and all(judged.satisfied)


def soft_satisfied(judged: Judged) -> float:
    if not judged.satisfied:
        return 0.0
    return sum(judged.satisfied) / len(judged.satisfied)


# --------------------------------------------------------------------------- judgments


def parse_judgments(judge_output: str, num_constraints: int) -> tuple[bool, ...] | None:
    """FollowBench's reading of a judgment: one bool per constraint, or None when it cannot be read."""
    last_line = judge_output.strip("`").strip().split("\n")[-1]
    if num_constraints == 1:
        if "YES" in last_line:
            return (True,)
        return (False,) if "NO" in last_line else None
    listed = re.search(r"\[.*\]", last_line)
    if not listed:
        return None
    try:
        verdicts = ast.literal_eval(listed.group())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(verdicts, (list, tuple)) or len(verdicts) != num_constraints:
        return None
    if not all(v == "YES" or v in UNSATISFIED_WORDS for v in verdicts):
        return None
    return tuple(v == "YES" for v in verdicts)


# --------------------------------------------------------------------------- judge prompts

_CONSTRAINT_KIND = {
    "content": "content constraint",
    "situation": "situation constraint (information to describe a specific situation/background)",
    "style": "style constraint",
    "format": "format constraint",
    "mixed": "constraint",
}


def judge_prompt_for(category: str, instructions: Sequence[str], response: str) -> str:
    """FollowBench's judge prompt: the instruction at levels 0..n (``instructions``) and the level-n response."""
    if category not in _CONSTRAINT_KIND:
        known = ", ".join(_CONSTRAINT_KIND)
        raise UsageError(f"FollowBench has no judge prompt for category {category!r}", f"it has one for {known}")
    level, kind = len(instructions) - 1, _CONSTRAINT_KIND[category]
    if level == 1:
        return (
            f"Given an initial instruction, we add one {kind} and obtain the final instruction with 1 additional "
            f"constraint.\n\n#Initial Instruction#\n{instructions[0]}\n\n"
            f"#Initial Instruction + 1 constraint#\n{instructions[1]}\n\n"
            f"#Answer of Initial Instruction + 1 constraint#\n{response}\n\n"
            "#System#\n1) Please identify the 1 added constraint.\n2) Please descriminate if the #Answer of "
            "Initial Instruction + 1 constraint# satisfies the 1 added constraint.\n3) In the final line, only "
            "output a Python LIST with 1 element ('YES' or 'NO') indicating whether the answer satisfies the 1 "
            "added constraint."
        )
    steps = "".join(
        f"#Initial Instruction + {n} constraint{'s' if n > 1 else ''}#\n{instructions[n]}\n\n"
        for n in range(1, level + 1)
    )
    return (
        f"Given an initial instruction, we add one {kind} per time and obtain the final instruction with {level} "
        f"additional constraints.\n\n#Initial Instruction#\n{instructions[0]}\n\n{steps}"
        f"#Answer of Initial Instruction + {level} constraints#\n{response}\n\n"
        f"#System#\n1) Please identify all {level} added constraints.\n2) For the {level} added constraints, "
        f"discriminate if the #Answer of Initial Instruction + {level} constraints# satisfies each constraint.\n"
        f"3) In the final line, only output a Python LIST with {level} elements ('YES' or 'NO') indicating whether "
        "the answer satisfies each constraint."
    )


def group_key(row: dict) -> str:
    """The seed-instruction group of a FollowBench row: its constraint type and example id."""
    kind = row.get("constraint_type", row.get("category", ""))
    return f"{kind}/{row.get('example_id', row.get('id', ''))}"


def with_constraint_types(rows: Iterable[dict]) -> list[dict]:
    """Copies of the rows with ``constraint_type``: the FollowBench file (and judge prompt) they belong to.

    In ``mixed_constraints.json`` only the level-0 row says ``mixed``; the others name the kinds of their
    constraints (``format, content``). As FollowBench's scripts do, a row belongs to the seed of the level-0
    row it follows (same example id, no other id between); rows with no seed (the ``example`` file) keep
    their category.
    """
    typed, seed_kind, seed_id = [], None, None
    for row in rows:
        if int(row["level"]) == 0:
            seed_kind, seed_id = row.get("category", ""), row.get("example_id")
        elif row.get("example_id") != seed_id:
            seed_kind, seed_id = None, None  # a seed's rows are consecutive
        kind = row.get("constraint_type") or seed_kind or row.get("category", "")
        typed.append(dict(row, constraint_type=kind))
    return typed


def constrained_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows to answer and score (levels 1-5), each with its ``constraint_type``."""
    return [row for row in with_constraint_types(rows) if int(row["level"]) >= 1]


def instruction_chains(rows: Iterable[dict]) -> dict[str, dict[int, str]]:
    """The instruction at each level, per seed group."""
    chains: dict[str, dict[int, str]] = defaultdict(dict)
    for row in with_constraint_types(rows):
        chains[group_key(row)][int(row["level"])] = row["instruction"]
    return dict(chains)


def _chain_up_to(chains: dict[str, dict[int, str]], row: dict) -> list[str]:
    key, level = group_key(row), int(row["level"])
    missing = [n for n in range(level + 1) if n not in chains.get(key, {})]
    if missing:
        raise UsageError(
            f"FollowBench group {key} has no instruction at level(s) {missing}",
            f"the judge prompt of level {level} lists every level from 0: pass the whole *_constraints.json file",
        )
    return [chains[key][n] for n in range(level + 1)]


# --------------------------------------------------------------------------- checking the input


def check_row_fields(rows: Sequence, source: str) -> None:
    """Refuse rows (of the file `source`) that lack a field every FollowBench row has: ``instruction``, a
    ``level`` from 0 to 5, ``example_id`` (or ``id``) and ``category`` (or ``constraint_type``)."""
    for number, row in enumerate(rows, start=1):
        where = f"{source}: row {number}"
        if not isinstance(row, dict):
            raise UsageError(f"{where} is not a JSON object", DATA_FIX)
        missing = [name for name, alternatives in _REQUIRED_FIELDS if not any(a in row for a in alternatives)]
        if missing:
            raise UsageError(f"{where} has no {' / '.join(missing)} field", DATA_FIX)
        if not isinstance(row["instruction"], str):
            raise UsageError(f"{where} has an instruction that is not text", DATA_FIX)
        try:
            level = int(row["level"])
        except (TypeError, ValueError):
            level = None
        if level is None or not 0 <= level <= LEVELS[-1] or isinstance(row["level"], bool):
            raise UsageError(f"{where} has level {row['level']!r}; FollowBench levels are 0 to {LEVELS[-1]}", DATA_FIX)


_REQUIRED_FIELDS = (
    ("instruction", ("instruction",)),
    ("level", ("level",)),
    ("example_id", ("example_id", "id")),
    ("category", ("category", "constraint_type")),
)


def _scored_rows(all_rows: Sequence[dict], rows: Sequence[dict]) -> tuple[list[dict], dict[str, dict[int, str]]]:
    """`rows` with the ``constraint_type`` of their seed, and the instruction chains of `all_rows`."""
    typed = with_constraint_types(all_rows)
    chains = instruction_chains(typed)
    kind_of = {_row_identity(row): row["constraint_type"] for row in typed}
    rows = [dict(row, constraint_type=row.get("constraint_type") or kind_of.get(_row_identity(row), ""))
            for row in rows]  # fmt: skip
    return rows, chains


def check_scorable(all_rows: Sequence[dict], rows: Sequence[dict]) -> None:
    """Refuse, before any response is generated, rows to be scored (``rows``, levels >= 1) that could not be:
    a rule-scored row without what its rule reads, a judged row whose constraint type has no judge prompt or
    whose seed lacks an instruction of a lower level in ``all_rows``."""
    typed, chains = _scored_rows(all_rows, rows)
    for row in typed:
        _check_scorable_row(row, chains)


def _check_scorable_row(row: dict, chains: dict[str, dict[int, str]]) -> None:
    where = f"FollowBench row {group_key(row)} (level {row['level']})"
    if is_rule_scored(row):
        problem = rule_input_problem(row)
        if problem:
            raise UsageError(f"{where} {problem}", DATA_FIX)
        return
    if row["constraint_type"] not in _CONSTRAINT_KIND:
        raise UsageError(
            f"{where} has constraint type {row['constraint_type']!r}, which FollowBench has no judge prompt for",
            f"use one of {', '.join(_CONSTRAINT_KIND)} (the category of the seed's level-0 row), or {DATA_FIX}",
        )
    _chain_up_to(chains, row)


def judged_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows the LLM judge scores (FollowBench's rules score the others)."""
    return [row for row in rows if not is_rule_scored(row)]


# --------------------------------------------------------------------------- scoring


@dataclass
class FollowBenchScores:
    """Rates (`satisfaction_rates`) and one record per response: row, response, judge output, verdicts."""

    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)


def score_responses(
    all_rows: Sequence[dict],
    rows: Sequence[dict],
    responses: Sequence[str],
    ask_judge: Callable[[list[str]], list[str]],
) -> FollowBenchScores:
    """Score responses to ``rows`` (levels >= 1): rule-scored rows by FollowBench's rules, the rest by
    ``ask_judge`` (prompts -> judge outputs, called once with every prompt). ``all_rows`` holds every level of
    each seed (the judge prompt lists them)."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(rows)} FollowBench rows")
    rows, chains = _scored_rows(all_rows, rows)
    for row in rows:
        _check_scorable_row(row, chains)
    judged_rows = [i for i, row in enumerate(rows) if not is_rule_scored(row)]
    prompts = [judge_prompt_for(rows[i]["constraint_type"], _chain_up_to(chains, rows[i]), responses[i])
               for i in judged_rows]  # fmt: skip
    outputs = dict(zip(judged_rows, ask_judge(prompts) if prompts else [], strict=True))
    judged, records = [], []
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        level = int(row["level"])
        if i in outputs:
            satisfied, judge_output = parse_judgments(outputs[i], level), outputs[i]
        else:
            satisfied, judge_output = (rule_satisfied(row, response),), None
        judged.append(Judged(group_key(row), level, satisfied))
        records.append(
            dict(row, response=response, judge_output=judge_output, satisfied=satisfied,
                 needs_manual_check=satisfied is None)
        )  # fmt: skip
    return FollowBenchScores(satisfaction_rates(judged), records)


def _row_identity(row: dict) -> tuple:
    return (row.get("category"), row.get("example_id"), int(row["level"]), row.get("instruction"))


def satisfaction_rates(judged: Iterable[Judged]) -> dict[str, float]:
    """``hsr/level_k``, ``ssr/level_k``, their means over levels, ``csl``, the same per category
    (``<category>/...``), and ``needs_manual_check``: the responses whose judgment could not be read."""
    judged = [item for item in judged if item.level >= 1]
    if not judged:
        raise ValueError("no judged responses at levels 1-5")
    rates = _rates(judged, prefix="")
    for category in sorted({item.category for item in judged}):
        rates.update(_rates([item for item in judged if item.category == category], prefix=f"{category}/"))
    rates["needs_manual_check"] = float(sum(item.satisfied is None for item in judged))
    return rates


def _rates(judged: list[Judged], prefix: str) -> dict[str, float]:
    by_level: dict[int, list[Judged]] = defaultdict(list)
    by_group: dict[str, dict[int, bool | None]] = defaultdict(dict)
    for item in judged:
        by_group[item.group][item.level] = None if item.satisfied is None else hard_satisfied(item)
        if item.satisfied is not None:
            by_level[item.level].append(item)
    rates: dict[str, float] = {}
    for level in sorted(by_level):
        items = by_level[level]
        rates[f"{prefix}hsr/level_{level}"] = sum(hard_satisfied(i) for i in items) / len(items)
        rates[f"{prefix}ssr/level_{level}"] = sum(soft_satisfied(i) for i in items) / len(items)
    if by_level:
        rates[f"{prefix}hsr/avg"] = sum(rates[f"{prefix}hsr/level_{k}"] for k in by_level) / len(by_level)
        rates[f"{prefix}ssr/avg"] = sum(rates[f"{prefix}ssr/level_{k}"] for k in by_level) / len(by_level)
    runs = [run for run in map(consistent_levels, by_group.values()) if run is not None]
    if runs:
        rates[f"{prefix}csl"] = sum(runs) / len(runs)
    return rates


def consistent_levels(outcomes_by_level: dict[int, bool | None]) -> int | None:
    """The number of consecutive fully satisfied levels from level 1; None if an unreadable judgment (None)
    comes before the first failed level."""
    count = 0
    for level in LEVELS:
        outcome = outcomes_by_level.get(level, False)
        if outcome is None:
            return None
        if not outcome:
            break
        count += 1
    return count
