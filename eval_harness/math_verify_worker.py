"""HF ``math-verify`` comparisons under a hard per-comparison time limit, from any thread.

math-verify bounds its own work with ``signal.alarm``, which only works in a process's main thread and cannot
interrupt one long C-level operation (a huge integer power such as ``9^{9^{9}}``). lm-eval and ``milora eval``
may call a scorer from worker threads, so the comparisons run in a child process instead: one long-lived
``python -m eval_harness.math_verify_worker`` per process, fed one JSON line per comparison. The child runs
math-verify in its own main thread with math-verify's timeouts on; if an answer does not come back within the
limit the child is killed (the comparison counts as not equal) and a fresh one starts on the next call.

Every line the child writes for the client starts with `REPLY_TAG` and names the request it answers (``id``;
``"ready"`` once math-verify is imported), so that anything else on the child's stdout (a library printing
while it loads or compares) is skipped, never taken for a verdict. A child that cannot start (math-verify not
installed, a crash on import, no ready line within `_STARTUP_LIMIT_S`) is not started again: one warning, and
every later comparison is "not equal", so the lenient score falls back to Hendrycks' ``is_equiv`` alone.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_TIME_LIMIT_S = 5.0
_STARTUP_LIMIT_S = 120.0  # importing SymPy and the LaTeX grammar on a busy machine
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
REPLY_TAG = "@milora-math-verify "
READY_ID = "ready"
WORKER_COMMAND = (sys.executable, "-m", "eval_harness.math_verify_worker")
LOGGER = logging.getLogger(__name__)


class MathVerifyWorker:
    """A child process answering ``(gold, prediction) -> equal?`` with math-verify; thread-safe.

    `command` starts the child (default: this module); it must speak the protocol of `serve`.
    """

    def __init__(self, command: Sequence[str] = WORKER_COMMAND) -> None:
        self._command = list(command)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._next_id = 0
        self.start_failure: str | None = None  # why the child could not start; then it is never started again

    def equal(self, gold: str, prediction: str, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> bool:
        """Whether math-verify finds the two LaTeX answers equal; False on a timeout or any failure."""
        with self._lock:
            if self.start_failure is not None:
                return False
            if self._process is None or self._process.poll() is not None:
                try:
                    self._start()
                    self._await_reply(READY_ID, _STARTUP_LIMIT_S)
                except (OSError, TimeoutError, ValueError) as error:
                    self.close_locked()
                    self.start_failure = str(error)
                    LOGGER.warning(
                        "math-verify is unavailable (%s); exact_match_flex uses is_equiv alone from here on", error
                    )
                    return False
            self._next_id += 1
            request = {"id": self._next_id, "gold": gold, "prediction": prediction, "limit": time_limit_s}
            try:
                self._process.stdin.write(json.dumps(request) + "\n")
                self._process.stdin.flush()
                reply = self._await_reply(self._next_id, time_limit_s + 1.0)  # + the pipe round trip
            except (OSError, TimeoutError, ValueError):
                self.close_locked()
                return False
        return bool(reply.get("equal", False))

    def _start(self) -> None:
        search_path = os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")]))
        environment = dict(os.environ, PYTHONPATH=search_path)
        self._process = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            env=environment,
        )
        self._replies = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, self._replies), daemon=True).start()

    def _await_reply(self, request_id: int | str, limit_s: float) -> dict[str, Any]:
        """The child's reply to `request_id`; other lines (untagged, or for another request) are skipped."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                line = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer from math-verify within {limit_s:.1f} s") from None
            if line is None:
                raise OSError("the math-verify worker exited")
            reply = parse_reply(line)
            if reply is None or reply.get("id") != request_id:
                continue
            if "error" in reply:
                raise OSError(f"the math-verify worker failed: {reply['error']}")
            return reply

    def close_locked(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
            self._process = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def reply_line(reply: dict[str, Any]) -> str:
    """One line of the child to the client: `REPLY_TAG` and the reply as JSON."""
    return REPLY_TAG + json.dumps(reply)


def parse_reply(line: str) -> dict[str, Any] | None:
    """The reply a line of the child carries (after any unterminated text a library wrote before it), or None
    for any other line on its stdout."""
    start = line.find(REPLY_TAG)
    if start < 0:
        return None
    try:
        reply = json.loads(line[start + len(REPLY_TAG) :])
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def _pump_lines(stream, replies: queue.Queue) -> None:
    try:
        for line in stream:
            replies.put(line)
    except (OSError, ValueError):
        pass
    replies.put(None)


_WORKER = MathVerifyWorker()
atexit.register(_WORKER.close)


def math_verify_equal(gold: str, prediction: str, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> bool:
    """math-verify's verdict on two LaTeX answers (each read as ``$answer$``), within ``time_limit_s``."""
    return _WORKER.equal(gold, prediction, time_limit_s)


# --------------------------------------------------------------------------- the child process


def _compare(gold: str, prediction: str, limit_s: float) -> bool:
    from math_verify import parse, verify

    step_limit = max(1, math.floor(limit_s / 3))  # two parses and one comparison share the limit
    gold_parsed = parse(f"${gold}$", parsing_timeout=step_limit)
    predicted = parse(f"${prediction}$", parsing_timeout=step_limit)
    if not gold_parsed or not predicted:
        return False
    return bool(verify(gold_parsed, predicted, timeout_seconds=step_limit))


def serve() -> None:
    try:
        import math_verify  # noqa: F401 - import once, before announcing readiness
    except Exception as error:  # noqa: BLE001 - whatever stops the import, the client is told and gives up
        print(reply_line({"id": READY_ID, "error": f"{type(error).__name__}: {error}"}), flush=True)
        return
    print(reply_line({"id": READY_ID}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = _compare(request["gold"], request["prediction"], float(request["limit"]))
        except Exception:  # noqa: BLE001 - any failure inside math-verify is "not equal"
            equal = False
        print(reply_line({"id": request["id"], "equal": equal}), flush=True)


if __name__ == "__main__":
    serve()
