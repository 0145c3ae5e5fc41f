"""FollowBench scoring as FollowBench's scripts do it: judgment parsing, rules, prompts, rates; on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_harness import followbench as fb
from eval_harness import followbench_rules as rules

FOLLOWBENCH_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "followbench"


@pytest.fixture(scope="module")
def followbench_data():
    """FollowBench's data files, by constraint type."""
    if not FOLLOWBENCH_DIR.is_dir():
        pytest.skip(f"the shared FollowBench data is not at {FOLLOWBENCH_DIR}")
    return {path.name.split("_")[0]: json.loads(path.read_text()) for path in FOLLOWBENCH_DIR.glob("*.json")}


# --------------------------------------------------------------------------- judgments
@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("analysis...\n['YES', 'NO']", 2, (True, False)),
        ("first try ['NO']\nfinal: ['YES']", 1, (True,)),  # only the last line counts
        ("YES", 1, (True,)),  # audit: a bare YES at level 1 is satisfied
        ("The constraint is met: YES.", 1, (True,)),
        ("NO", 1, (False,)),
        ("yes", 1, None),  # FollowBench looks for upper-case YES / NO
        ("['PARTIAL', 'YES', 'N/A']", 3, (False, True, False)),  # audit: unsatisfied, the rest still counts
        ("['MAYBE', 'UNKNOWN']", 2, (False, False)),
        ("```\n['YES', 'YES']\n```", 2, (True, True)),  # code fences around the list
        ("['YES', 'NO']\nThat is all.", 2, None),  # the list is not on the last line
        ("[YES, YES, NO]", 3, None),  # bare names: FollowBench's eval raises NameError
        ("['yes', 'no']", 2, None),
        ("['YES', 'NO']", 3, None),  # wrong number of judgments
        ("['Y' + 'ES', 'NO']", 2, None),  # judge output is never executed
        ("no list at all", 2, None),
    ],
)
def test_parse_judgments(text, n, expected):
    assert fb.parse_judgments(text, n) == expected


def test_unreadable_judgments_are_counted_for_a_manual_check_not_scored():
    judged = [
        fb.Judged("content/1", 1, (True,)),
        fb.Judged("content/1", 2, (True, True)),
        fb.Judged("content/1", 3, (True, False, True)),
        fb.Judged("content/2", 1, (False,)),
        fb.Judged("content/2", 2, (True, False)),
        fb.Judged("content/2", 3, None),  # after a failed level: this seed's CSL is still 0
        fb.Judged("style/3", 1, None),  # before any failure: CSL unknown, left out
        fb.Judged("style/3", 2, (False, False)),
    ]
    rates = fb.satisfaction_rates(judged)
    assert rates["needs_manual_check"] == 2
    assert rates["hsr/level_1"] == 0.5  # content/1 yes, content/2 no; style/3 unreadable
    assert rates["hsr/level_2"] == pytest.approx(1 / 3)
    assert rates["ssr/level_2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert rates["hsr/level_3"] == 0.0
    assert rates["ssr/level_3"] == pytest.approx(2 / 3)
    assert rates["csl"] == pytest.approx((2 + 0) / 2)
    assert rates["content/hsr/level_1"] == 0.5
    assert rates["style/hsr/level_2"] == 0.0
    assert "style/csl" not in rates


# --------------------------------------------------------------------------- rules
def _row(data, kind, source=None, level=1, example_id=None):
    return next(
        r for r in data[kind]
        if r["level"] == level and (source is None or r["source"] == source)
        and (example_id is None or r["example_id"] == example_id)
    )  # fmt: skip


def test_rule_scored_rows_are_the_ones_followbench_checks_by_rules(followbench_data):
    counts = {kind: sum(rules.is_rule_scored(r) for r in rows if r["level"] > 0)
              for kind, rows in followbench_data.items()}  # fmt: skip
    assert counts == {"example": 200, "content": 60, "situation": 40, "style": 0, "format": 10, "mixed": 40}


def test_example_category_matches_the_target_template(followbench_data):
    row = _row(followbench_data, "example")
    assert row["target"] == "{instruction}\n{{'AI assistant': '{answer}'}}"
    assert rules.rule_satisfied(row, "{'AI assistant': 'Car accident update'}")
    assert not rules.rule_satisfied(row, "Car accident update")
    assert not rules.rule_satisfied(row, "{'AI assistant': 'two\nlines'}")  # {answer} stays on one line


def test_source_rules_on_real_rows(followbench_data):
    e2e = _row(followbench_data, "content", "E2E", level=2)
    assert rules.rule_satisfied(e2e, e2e["target"]) and not rules.rule_satisfied(e2e, e2e["target"] + " ")
    conll = _row(followbench_data, "content", "CONLL2003", level=1)
    assert rules.rule_satisfied(conll, "['Britain', 'Germany', 'Bonn', 'BRUSSELS', 'Europe', 'France']".split("'")[1])
    time_row = _row(followbench_data, "situation", "BBH_time", level=1)
    assert rules.rule_satisfied(time_row, f"From 01/01/1900 on, the date is {time_row['target']}")
    assert not rules.rule_satisfied(time_row, f"{time_row['target']}, not 01/01/1900")  # the LAST date counts
    giga = _row(followbench_data, "mixed", "gigaword", level=5)
    assert rules.rule_satisfied(giga, "two dead in southern philippines blast in south")
    assert not rules.rule_satisfied(giga, "two dead in philippines bus blast in south")  # level 4: no "bus"
    giga_3 = _row(followbench_data, "mixed", "gigaword", level=3)
    assert rules.rule_satisfied(giga_3, "two dead in philippines bus blast in south")


def test_levels_add_constraints_for_cnn_dailymail(followbench_data):
    level = {k: _row(followbench_data, "mixed", "cnn_dailymail", level=k) for k in range(1, 6)}
    summary = "Potter is rich. The actor spends little. He has kept his films."
    assert [rules.rule_satisfied(level[k], summary) for k in range(1, 6)] == [True] * 5
    lavish = "Potter is rich. The actor is not lavish. He has kept his films."
    assert [rules.rule_satisfied(level[k], lavish) for k in range(1, 6)] == [True, True, True, False, False]


def test_format_example_22_as_followbench_checks_it(followbench_data):
    level = {k: _row(followbench_data, "format", level=k, example_id=22) for k in range(1, 6)}
    sentence = " ".join(["word"] * 22) + "."
    plain = "\n\n".join([sentence] * 3)
    assert [rules.rule_satisfied(level[k], plain) for k in range(1, 6)] == [True, True, True, False, False]
    # FollowBench's quirk: the marker "1." ends a one-word "sentence", so numbered paragraphs (level 4) never
    # have every sentence longer than 20 words (level 3).
    numbered = "\n\n".join(f"{n}. {sentence}" for n in (1, 2, 3))
    assert [rules.rule_satisfied(level[k], numbered) for k in range(1, 6)] == [True, True, False, False, False]


# --------------------------------------------------------------------------- prompts and end to end
def test_judge_prompt_is_followbench_s_own():
    prompt = fb.judge_prompt_for("content", ["Seed.", "Seed, one."], "My answer")
    assert prompt == (
        "Given an initial instruction, we add one content constraint and obtain the final instruction with 1 "
        "additional constraint.\n\n#Initial Instruction#\nSeed.\n\n#Initial Instruction + 1 constraint#\nSeed, one."
        "\n\n#Answer of Initial Instruction + 1 constraint#\nMy answer\n\n#System#\n1) Please identify the 1 added "
        "constraint.\n2) Please descriminate if the #Answer of Initial Instruction + 1 constraint# satisfies the 1 "
        "added constraint.\n3) In the final line, only output a Python LIST with 1 element ('YES' or 'NO') "
        "indicating whether the answer satisfies the 1 added constraint."
    )
    three = fb.judge_prompt_for("situation", ["S0", "S1", "S2", "S3"], "A")
    steps = ["+ 1 constraint#\nS1", "+ 2 constraints#\nS2", "+ 3 constraints#\nS3", "+ 3 constraints#\nA"]
    assert [three.index(step) for step in steps] == sorted(three.index(step) for step in steps)
    assert "situation constraint (information to describe a specific situation/background) per time" in three
    with pytest.raises(ValueError, match="no judge prompt for category 'example'"):
        fb.judge_prompt_for("example", ["a", "b"], "c")


def test_mixed_rows_belong_to_the_mixed_seed(followbench_data):
    typed = fb.with_constraint_types(followbench_data["mixed"])
    assert {row["constraint_type"] for row in typed} == {"mixed"}
    assert {row["category"] for row in typed} > {"mixed", "format, content"}


def test_score_responses_on_real_rows_judges_only_what_rules_do_not_score(followbench_data):
    all_rows = followbench_data["situation"] + followbench_data["mixed"] + followbench_data["example"]
    rows = fb.constrained_rows(all_rows)
    responses = [f"answer {i}" for i in range(len(rows))]
    asked = []

    def judge(prompts):  # a judge that satisfies every constraint, except that it answers "yes" at level 1
        asked.extend(prompts)
        levels = [int(p.split("Python LIST with ")[1].split(" ")[0]) for p in prompts]
        return ["1) ...\nyes" if n == 1 else str(["YES"] * n) for n in levels]

    scores = fb.score_responses(all_rows, rows, responses, judge)
    rule_rows = [r for r in rows if rules.is_rule_scored(r)]
    assert (len(rows), len(rule_rows), len(asked)) == (110 + 85 + 200, 40 + 40 + 200, 70 + 45)
    assert all("#Answer of Initial Instruction" in p for p in asked)
    judged_level_1 = [r for r in scores.records if r["judge_output"] is not None and r["level"] == 1]
    assert all(r["needs_manual_check"] for r in judged_level_1)
    assert scores.metrics["needs_manual_check"] == len(judged_level_1)
    # "answer i" has the shape of one of the 40 level-1 templates only: the bare "{instruction}\n{answer}"
    assert scores.metrics["example/hsr/level_1"] == 1 / 40
    # level 2 of the 17 mixed seeds: the 9 judged ones pass; of the 8 rule-scored ones, the "one short sentence"
    # rules of xsum, samsum and arxiv pass, text_editing (x3), cnn_dailymail and gigaword fail
    assert scores.metrics["mixed/hsr/level_2"] == pytest.approx(12 / 17)


# --------------------------------------------------------------------------- input checks, before generation
SAMPLE_FILE = Path(__file__).resolve().parent / "fixtures" / "followbench_sample.json"


def _sample_rows() -> list[dict]:
    return json.loads(SAMPLE_FILE.read_text())


def _without(rows: list[dict], index: int, field: str) -> list[dict]:
    rows[index] = {k: v for k, v in rows[index].items() if k != field}
    return rows


def _with(rows: list[dict], index: int, **fields) -> list[dict]:
    rows[index] = dict(rows[index], **fields)
    return rows


def _tone_seed(rows):  # seed 1 (all its levels) in a category FollowBench has no judge prompt for
    return [dict(row, category="tone") if row["example_id"] == 1 else row for row in rows]


def _example_row_without_target(rows):
    return [*rows, {"example_id": 7, "category": "example", "source": "imdb", "level": 1, "instruction": "Say."}]


BAD_DATA = {
    "missing instruction": (lambda rows: _without(rows, 1, "instruction"), ["row 2 has no instruction field"]),
    "missing level": (lambda rows: _without(rows, 4, "level"), ["row 5 has no level field"]),
    "level out of range": (lambda rows: _with(rows, 2, level="two"), ["row 3 has level 'two'", "0 to 5"]),
    "unknown constraint type": (_tone_seed, ["tone/1 (level 1) has constraint type 'tone'", "use one of content"]),
    "seed without level 0": (lambda rows: rows[1:], ["content/1 has no instruction at level(s) [0]", "whole"]),
    "rule row without target": (_example_row_without_target, ["example/7 (level 1) has no 'target'"]),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_followbench_data_is_refused_before_the_model_generates(tiny_llama_dir, tmp_path, capsys, case):
    from milora.cli import main as milora_main
    from tests.eval_harness.stub_judge import StubJudge

    edit, named = BAD_DATA[case]
    data = tmp_path / "followbench.json"
    data.write_text(json.dumps(edit(_sample_rows())))
    with StubJudge() as judge:
        args = ["--suite", "followbench", "--model", str(tiny_llama_dir), "--followbench_file", str(data),
                "--judge_base_url", judge.base_url, "--judge_model", "stub-judge",
                "--output_dir", str(tmp_path / "out"), "--max_gen_toks", "2", "--device", "cpu"]  # fmt: skip
        status = milora_main(["eval", *args])
        assert judge.requests == []
    assert status == 2
    err = capsys.readouterr().err
    # The checkpoint never loaded nor generated: no loading or generation progress before the error.
    assert "followbench generation" not in err and "Loading weights" not in err, err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("milora eval: error: ") and "Traceback" not in err
    assert all(piece in line for piece in named), line
    assert "; " in line  # the problem, then how to fix it


def test_a_judged_run_without_a_judge_is_refused_before_the_model_generates(tiny_llama_dir, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    from milora.cli import main as milora_main

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    args = ["eval", "--suite", "followbench", "--model", str(tiny_llama_dir), "--followbench_file", str(SAMPLE_FILE),
            "--output_dir", str(tmp_path / "out"), "--max_gen_toks", "2", "--device", "cpu"]  # fmt: skip
    assert milora_main(args) == 2
    err = capsys.readouterr().err
    assert "followbench generation" not in err and "Loading weights" not in err, err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert "4 of the 4 FollowBench rows are scored by an LLM judge, and no judge is set" in line
    assert "--judge_base_url" in line and "OPENAI_API_KEY" in line
    # Rows FollowBench scores by rules need no judge: they run.
    rule_rows = [dict(row, category="example", target="{instruction}\n{answer}") for row in _sample_rows()]
    data = tmp_path / "example.json"
    data.write_text(json.dumps(rule_rows))
    assert milora_main([*args, "--followbench_file", str(data)]) == 0
    assert "followbench generation" in capsys.readouterr().err  # the progress these checks look for


def test_followbench_s_own_files_pass_the_input_checks(followbench_data):
    rows = [row for kind in sorted(followbench_data) for row in followbench_data[kind]]
    fb.check_row_fields(rows, "FollowBench data")
    constrained = fb.constrained_rows(rows)
    fb.check_scorable(rows, constrained)
    assert (len(constrained), len(fb.judged_rows(constrained))) == (820, 470)


def test_rule_input_problems(followbench_data):
    conll = _row(followbench_data, "content", "CONLL2003", level=1)
    assert rules.rule_input_problem(conll) is None
    assert "not a Python list literal" in rules.rule_input_problem(dict(conll, target="[unclosed"))
    assert "has no 'target'" in rules.rule_input_problem({k: v for k, v in conll.items() if k != "target"})
    xsum = _row(followbench_data, "mixed", "xsum", level=2)  # counts sentences and words: no target needed
    assert rules.rule_input_problem(dict(xsum, target="")) is None
    with pytest.raises(ValueError, match="has no 'target'"):
        fb.score_responses([conll], [dict(conll, target="")], ["answer"], lambda prompts: [])
