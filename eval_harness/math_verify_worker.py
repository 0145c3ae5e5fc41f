"""HF ``math-verify`` comparisons under a hard per-comparison time limit, from any thread.

math-verify bounds its own work with ``signal.alarm``, which only works in a process's main thread and cannot
interrupt one long C-level operation (a huge integer power such as ``9^{9^{9}}``). lm-eval and ``milora eval``
may call a scorer from worker threads, so the comparisons run in a child process instead: one long-lived
``python -m eval_harness.math_verify_worker`` per process, fed one JSON line per comparison. The child runs
math-verify in its own main thread with math-verify's timeouts on; if an answer does not come back within the
limit the child is killed (the comparison counts as not equal) and a fresh one starts on the next call.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

DEFAULT_TIME_LIMIT_S = 5.0
_STARTUP_LIMIT_S = 120.0  # importing SymPy and the LaTeX grammar on a busy machine
_REPO_ROOT = str(Path(__file__).resolve().parents[1])


class MathVerifyWorker:
    """A child process answering ``(gold, prediction) -> equal?`` with math-verify; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()

    def equal(self, gold: str, prediction: str, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> bool:
        """Whether math-verify finds the two LaTeX answers equal; False on a timeout or any failure."""
        request = json.dumps({"gold": gold, "prediction": prediction, "limit": time_limit_s}) + "\n"
        with self._lock:
            try:
                started = self._process is not None and self._process.poll() is None
                if not started:
                    self._start()
                    self._await_reply(_STARTUP_LIMIT_S)  # the child's "ready" line
                self._process.stdin.write(request)
                self._process.stdin.flush()
                reply = self._await_reply(time_limit_s + 1.0)  # + the pipe round trip
            except (OSError, TimeoutError, ValueError):
                self.close_locked()
                return False
        return bool(json.loads(reply).get("equal", False))

    def _start(self) -> None:
        search_path = os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")]))
        environment = dict(os.environ, PYTHONPATH=search_path)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "eval_harness.math_verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            env=environment,
        )
        self._replies = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, self._replies), daemon=True).start()

    def _await_reply(self, limit_s: float) -> str:
        try:
            line = self._replies.get(timeout=limit_s)
        except queue.Empty:
            raise TimeoutError(f"no answer from math-verify within {limit_s:.1f} s") from None
        if line is None:
            raise OSError("the math-verify worker exited")
        return line

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
    import math_verify  # noqa: F401 - import once, before announcing readiness

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = _compare(request["gold"], request["prediction"], float(request["limit"]))
        except Exception:  # noqa: BLE001 - any failure inside math-verify is "not equal"
            equal = False
        print(json.dumps({"equal": equal}), flush=True)


if __name__ == "__main__":
    serve()
