"""FollowBench scoring: hard/soft satisfaction rates per constraint level from per-constraint judgments.

FollowBench builds, for each seed instruction (level 0), variants with 1..5 added constraints (levels 1-5).
A judge decides for a response at level n whether each of its n constraints is satisfied. From those
per-constraint judgments:

- HSR (hard satisfaction rate) of a level: the share of responses whose constraints are ALL satisfied;
- SSR (soft satisfaction rate) of a level: the mean share of satisfied constraints per response;
- CSL (consistent satisfaction levels) of a seed instruction: how many levels in a row, from level 1, are
  fully satisfied; averaged over seed instructions.

`judge_prompt` writes FollowBench's LLM-judge prompt for one response (the seed instruction and the
instruction with n constraints) and `parse_judgments` reads the judge's final ``['YES', 'NO', ...]`` line.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LEVELS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Judged:
    """One judged response: its seed group, level and one bool per constraint (None: unparsable judgment)."""

    group: str
    level: int
    satisfied: tuple[bool, ...] | None


def hard_satisfied(judged: Judged) -> bool:
    return bool(judged.satisfied) and all(judged.satisfied)


def soft_satisfied(judged: Judged) -> float:
    if not judged.satisfied:
        return 0.0
    return sum(judged.satisfied) / len(judged.satisfied)


def satisfaction_rates(judged: Iterable[Judged]) -> dict[str, float]:
    """``hsr/level_k``, ``ssr/level_k`` for each level present, their means over levels, and ``csl``.

    An unparsable judgment counts as unsatisfied (as FollowBench counts a failed evaluation).
    """
    by_level: dict[int, list[Judged]] = defaultdict(list)
    by_group: dict[str, dict[int, bool]] = defaultdict(dict)
    for item in judged:
        if item.level < 1:
            continue
        by_level[item.level].append(item)
        by_group[item.group][item.level] = hard_satisfied(item)
    if not by_level:
        raise ValueError("no judged responses at levels 1-5")
    rates: dict[str, float] = {}
    for level in sorted(by_level):
        items = by_level[level]
        rates[f"hsr/level_{level}"] = sum(hard_satisfied(i) for i in items) / len(items)
        rates[f"ssr/level_{level}"] = sum(soft_satisfied(i) for i in items) / len(items)
    levels = sorted(by_level)
    rates["hsr/avg"] = sum(rates[f"hsr/level_{k}"] for k in levels) / len(levels)
    rates["ssr/avg"] = sum(rates[f"ssr/level_{k}"] for k in levels) / len(levels)
    rates["csl"] = sum(consistent_levels(outcomes) for outcomes in by_group.values()) / len(by_group)
    return rates


def consistent_levels(outcomes_by_level: dict[int, bool]) -> int:
    """The number of consecutive fully satisfied levels starting at level 1."""
    count = 0
    for level in LEVELS:
        if not outcomes_by_level.get(level, False):
            break
        count += 1
    return count


_LIST_LINE = re.compile(r"\[[^\[\]]*\]")


def parse_judgments(judge_output: str, num_constraints: int) -> tuple[bool, ...] | None:
    """The last Python-style list of YES/NO in the judge's output, if it has one entry per constraint."""
    for candidate in reversed(_LIST_LINE.findall(judge_output)):
        try:
            values = ast.literal_eval(candidate)
        except (ValueError, SyntaxError):
            values = [v.strip(" '\"") for v in candidate.strip("[]").split(",")]
        if not isinstance(values, (list, tuple)):
            continue
        words = [str(v).strip().upper() for v in values]
        if len(words) == num_constraints and all(w in ("YES", "NO") for w in words):
            return tuple(w == "YES" for w in words)
    return None


def judge_prompt(seed_instruction: str, constrained_instruction: str, response: str, level: int) -> str:
    """FollowBench's judge prompt (constraint-evolution path, condensed to the seed and level-n instructions)."""
    return (
        "Given an initial instruction, we add one constraint per time and obtain the final instruction with "
        f"{level} additional constraints.\n\n"
        f"#Initial Instruction#\n{seed_instruction}\n\n"
        f"#Initial Instruction + {level} Constraints#\n{constrained_instruction}\n\n"
        f"#Response of Initial Instruction + {level} Constraints#\n{response}\n\n"
        "#System#\n"
        f"1) Please identify all {level} added constraints.\n"
        f"2) For the {level} added constraints, discriminate if the #Response of Initial Instruction + {level} "
        "Constraints# satisfies each constraint.\n"
        f"3) In the final line, only output a Python LIST with {level} elements ('YES' or 'NO') indicating "
        "whether the response satisfies each constraint, e.g., ['YES', 'NO', 'YES']."
    )


def group_key(row: dict) -> str:
    """The seed-instruction group of a FollowBench row (its category and example id)."""
    return f"{row.get('category', '')}/{row.get('example_id', row.get('id', ''))}"


def seed_instructions(rows: Sequence[dict]) -> dict[str, str]:
    """Level-0 instruction per group (the level-1 one when a file has no level 0)."""
    seeds: dict[str, tuple[int, str]] = {}
    for row in rows:
        key, level = group_key(row), int(row["level"])
        if key not in seeds or level < seeds[key][0]:
            seeds[key] = (level, row["instruction"])
    return {key: instruction for key, (_, instruction) in seeds.items()}
