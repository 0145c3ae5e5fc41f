"""The math-verify worker's protocol: tagged replies with request ids, and giving up after a failed start.

The workers here run the real `eval_harness.math_verify_worker.serve` (with real math-verify) in a child
process, started by a small `python -c` program that makes it noisy or unable to start.
"""

from __future__ import annotations

import logging
import sys

import pytest

from eval_harness import math_verify_worker as mvw

# The real worker, with a "library" that prints on stdout while the child loads and during every comparison:
# an untagged line shaped like a verdict, and an unterminated line the tagged reply gets glued to.
NOISY_WORKER = """
import sys
print("loading the LaTeX grammar ...", flush=True)
print("ready", flush=True)
import eval_harness.math_verify_worker as worker
compare = worker._compare
def noisy_compare(gold, prediction, limit):
    print('{"equal": true}', flush=True)
    print(worker.REPLY_TAG + '{"id": -1, "equal": true}', flush=True)
    sys.stdout.write("sympy: warning, no newline ")
    return compare(gold, prediction, limit)
worker._compare = noisy_compare
worker.serve()
"""


@pytest.fixture
def noisy_worker():
    worker = mvw.MathVerifyWorker([sys.executable, "-c", NOISY_WORKER])
    yield worker
    worker.close()


def test_replies_are_read_by_their_tag_and_id_among_foreign_lines(noisy_worker):
    assert noisy_worker.equal("2", "3") is False  # an untagged '{"equal": true}' line is not the verdict
    assert noisy_worker.equal("\\frac{1}{2}", "0.5") is True
    assert noisy_worker.equal("\\sqrt{18}", "3\\sqrt{2}") is True
    assert noisy_worker.equal("-5", "5") is False  # a tagged reply to another request is not the verdict
    assert noisy_worker.start_failure is None


def test_parse_reply():
    assert mvw.parse_reply(mvw.reply_line({"id": 3, "equal": True}) + "\n") == {"id": 3, "equal": True}
    assert mvw.parse_reply("progress 50%" + mvw.reply_line({"id": 4, "equal": False})) == {"id": 4, "equal": False}
    for foreign in ('{"id": 3, "equal": true}\n', "ready\n", mvw.REPLY_TAG + "{not json\n", mvw.REPLY_TAG + "[1]\n"):
        assert mvw.parse_reply(foreign) is None


def _start_counting_worker(marker, then: str) -> mvw.MathVerifyWorker:
    """A worker whose every start appends a line to `marker`, then runs `then`."""
    program = f"open({str(marker)!r}, 'a').write('started\\n')\n{then}"
    return mvw.MathVerifyWorker([sys.executable, "-c", program])


@pytest.mark.parametrize(
    "then, reason",
    [
        ("raise SystemExit(1)", "exited"),  # dies before its ready line
        # math-verify cannot be imported: the worker says so in a tagged reply and stops
        ("import sys\nsys.modules['math_verify'] = None\nimport eval_harness.math_verify_worker as w\nw.serve()",
         "math_verify"),
    ],
)  # fmt: skip
def test_a_worker_that_cannot_start_is_tried_once_with_one_warning(tmp_path, caplog, then, reason):
    marker = tmp_path / "starts.txt"
    worker = _start_counting_worker(marker, then)
    with caplog.at_level(logging.WARNING, logger=mvw.LOGGER.name):
        verdicts = [worker.equal("\\frac{1}{2}", "0.5") for _ in range(4)]
    assert verdicts == [False] * 4  # "not equal": the lenient score is is_equiv's alone
    assert marker.read_text().splitlines() == ["started"]
    warnings = [record for record in caplog.records if record.name == mvw.LOGGER.name]
    assert len(warnings) == 1 and "math-verify is unavailable" in warnings[0].getMessage()
    assert reason in warnings[0].getMessage() and reason in worker.start_failure


def test_a_program_that_cannot_be_run_is_tried_once(tmp_path, caplog):
    worker = mvw.MathVerifyWorker([str(tmp_path / "no_such_program")])
    with caplog.at_level(logging.WARNING, logger=mvw.LOGGER.name):
        assert [worker.equal("1", "1") for _ in range(3)] == [False] * 3
    assert len([record for record in caplog.records if record.name == mvw.LOGGER.name]) == 1


def test_a_timed_out_comparison_is_not_a_failed_start():
    """A comparison cut off by its limit kills the child, which starts again for the next comparison."""
    worker = mvw.MathVerifyWorker()
    try:
        assert worker.equal("9^{9^{9}}", "7", time_limit_s=1.0) is False
        assert worker.start_failure is None
        assert worker.equal("3\\sqrt{2}", "\\sqrt{18}") is True
    finally:
        worker.close()
