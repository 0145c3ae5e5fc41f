"""Finished generations of an lm-eval run, streamed to JSONL files and reused by the next run.

A generation is stored the moment the model hands it to lm-eval's cache hook (`StoringCacheHook` wraps the
hook HFLM and `MiloraLM` report every answer to): one JSON line ``{"key", "task", "doc_id", "response"}`` in
``<folder>/<task>.generations.jsonl`` (``<task>.generations.rank<r>.jsonl`` for process r of a multi-process
run). The key is a hash of
the request (context and generation settings) and the run's identity (model and its weight files, dtype,
engine, context length), so a changed model or setting generates afresh. On start every such file of the
folder is read and requests already answered there are not generated again: an interrupted run resumes where
it stopped. Sampled requests (``do_sample``) are neither stored nor reused, as in lm-eval's own `CachingLM`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_fingerprint(name: str) -> list:
    """(file, size, modification time) of a local checkpoint's weight files: a retrained model in the same
    folder must not reuse the old one's stored generations."""
    path = Path(name)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def reusable(gen_kwargs: Mapping[str, Any]) -> bool:
    """Whether a request's answer is determined by its inputs (not sampled)."""
    return not gen_kwargs.get("do_sample", False)


class GenerationStore:
    """The stored generations under `folder` for one run identity (see the module docstring)."""

    def __init__(self, folder: Path, identity: Mapping[str, Any], rank: int = 0, world_size: int = 1):
        self.folder = Path(folder)
        self.identity = _digest(identity)
        self.rank, self.world_size = rank, world_size
        self.answers: dict[str, str] = {}
        for path in sorted(self.folder.glob("*.generations*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    continue
                if isinstance(row, dict) and "key" in row and "response" in row:
                    self.answers[row["key"]] = row["response"]

    def key(self, context: str, gen_kwargs: Mapping[str, Any]) -> str:
        return _digest([self.identity, context, dict(gen_kwargs)])

    def fill(self, requests: Sequence, results: list) -> list[int]:
        """Stored answers into `results` (by position); the positions still to generate."""
        todo = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args[:2]
            answer = self.answers.get(self.key(context, gen_kwargs)) if reusable(gen_kwargs) else None
            if answer is None:
                todo.append(i)
            else:
                results[i] = answer
        if len(todo) < len(requests):
            LOGGER.info("reusing %d stored generations from %s", len(requests) - len(todo), self.folder)
        return todo

    def file_for(self, task: str | None) -> Path:
        name = (task or "generations").replace("/", "_")
        suffix = "" if self.world_size == 1 else f".rank{self.rank}"
        return self.folder / f"{name}.generations{suffix}.jsonl"

    def add(self, key: str, task: str | None, doc_id: int | None, response: str) -> None:
        """Append one finished generation (flushed at once: a run killed later keeps it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        row = {"key": key, "task": task, "doc_id": doc_id, "response": response}
        with open(self.file_for(task), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.answers[key] = response


class StoringCacheHook:
    """lm-eval's cache hook that also stores every reusable generation answer of `requests` in `store`."""

    def __init__(self, inner, store: GenerationStore, requests: Sequence):
        self.inner, self.store = inner, store
        self.origin = {store.key(*r.args[:2]): (r.task_name, r.doc_id) for r in requests if reusable(r.args[1])}

    def add_partial(self, attr: str, req, res) -> None:
        self.inner.add_partial(attr, req, res)
        if attr != "generate_until":
            return
        key = self.store.key(*req[:2])
        if key in self.origin:
            self.store.add(key, *self.origin[key], res)
