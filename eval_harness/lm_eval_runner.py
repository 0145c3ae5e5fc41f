"""Running lm-eval tasks on a merged checkpoint and reading their metrics back.

One lm-eval model is built per run and shared by every task: `eval_harness.lm_eval_model.MiloraLM` (lm-eval's
HFLM, greedy generations from milora's engine, or HFLM's path with ``engine="hf"``) or lm-eval's vLLM model;
each task (or group) is evaluated by its own ``simple_evaluate`` call, so a task whose data cannot be loaded is
reported as skipped instead of stopping the others.

Generation settings: ``gen_kwargs`` of `run_tasks` replace the tasks' own (lm-eval applies them to every task
of the call, as ``lm_eval --gen_kwargs`` does); ``max_gen_toks_cap`` of `build_lm` only lowers each request's
limit: a task generates ``min(its own max_gen_toks, cap)`` new tokens (lm-eval's HFLM default, 256, for a task
that sets none), which is how a short-context model keeps room for its prompts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eval_harness.local_tasks import TASKS_DIR

LOGGER = logging.getLogger(__name__)


def task_manager(extra_include_paths: Sequence[str | os.PathLike] = (), include_defaults: bool = False):
    """A TaskManager over the project's tasks (+ extra folders, which win on name clashes).

    ``include_defaults=True`` adds lm-eval's own tasks (boolq, piqa, ifeval, ...), at the cost of indexing them.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(p) for p in extra_include_paths]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


# lm-eval's names for a request's new-token limit, in the priority order of its `normalize_gen_kwargs`.
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def capped_generation_kwargs(gen_kwargs: Mapping[str, Any], cap: int, default: int) -> dict[str, Any]:
    """A request's generation settings with its new-token limit lowered to at most `cap`, never raised: the
    limit the task set (under any of lm-eval's names; `default` when it set none) if smaller, else `cap`."""
    own = next((int(gen_kwargs[key]) for key in MAX_TOKEN_KEYS if gen_kwargs.get(key) is not None), default)
    kept = {key: value for key, value in gen_kwargs.items() if key not in MAX_TOKEN_KEYS}
    return {**kept, "max_gen_toks": min(own, cap)}


def build_lm(
    model_path: str,
    device: str = "cpu",
    batch_size: int | str = 8,
    dtype: str = "auto",
    max_length: int | None = None,
    max_gen_toks_cap: int | None = None,
    engine: str = "milora",
    generations_dir: str | os.PathLike | None = None,
):
    """lm-eval's model for a merged checkpoint directory, a hub id or a `.gguf` file.

    ``engine="milora"`` (default) and ``"hf"``: `eval_harness.lm_eval_model.MiloraLM`, lm-eval's HFLM whose
    greedy generations come from milora's engine (``"hf"``: HFLM's own path throughout); ``"vllm"``: lm-eval's
    vLLM model (`vllm_lm`). With `generations_dir`, finished generations are stored there as they come and
    reused by a rerun (`eval_harness.generation_store`).

    A GGUF file is loaded by milora's own loader (the float model `milora init` and training see, errors that
    name the file) and handed to HFLM with its tokenizer, rather than through HFLM's `gguf_file=`, which would
    keep transformers' GGUF quantizer on the model and report a bad file as a bare loader error.
    With `max_gen_toks_cap`, every generation makes at most that many new tokens, and never more than its
    task asks for (`capped_generation_kwargs`).
    """
    from milora.gguf import is_gguf_path

    if engine == "vllm":
        return vllm_lm(model_path, dtype=dtype, max_length=max_length)
    from eval_harness.lm_eval_model import MiloraLM

    kwargs: dict[str, Any] = {"pretrained": model_path, "device": device, "batch_size": batch_size, "dtype": dtype}
    if is_gguf_path(model_path):
        from eval_harness.generation import load_causal_lm

        model, tokenizer = load_causal_lm(model_path, device=device, dtype=dtype)
        kwargs = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length:
        kwargs["max_length"] = max_length
    extra = {"generations_dir": str(generations_dir)} if generations_dir else {}
    return MiloraLM(**kwargs, engine=engine, max_gen_toks_cap=max_gen_toks_cap, **extra)


def vllm_lm(model_path: str, dtype: str = "auto", max_length: int | None = None):
    """lm-eval's vLLM model (continuous batching, its own memory sizing, the first GPU) where the vllm package
    is installed. It neither streams generations for a rerun nor applies `build_lm`'s ``max_gen_toks_cap``."""
    import importlib.util

    from eval_harness.errors import UsageError

    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--engine vllm needs the vllm package, which is not installed", "pip install vllm")
    from lm_eval.models.vllm_causallms import VLLM

    kwargs: dict[str, Any] = {"pretrained": model_path, "dtype": dtype, "batch_size": "auto"}
    if max_length:
        kwargs["max_length"] = max_length
    return VLLM(**kwargs)


def metrics_of(results: dict) -> dict[str, dict[str, Any]]:
    """``{task_or_group: {metric: value}}`` from simple_evaluate's output, filter suffix and stderr dropped."""
    table: dict[str, dict[str, Any]] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            row = table.setdefault(task, {})
            for key, value in values.items():
                if "," not in key or "_stderr" in key:
                    continue
                metric, filter_name = key.split(",", 1)
                name = metric if filter_name == "none" else f"{metric}/{filter_name}"
                if isinstance(value, (int, float)) or hasattr(value, "item"):
                    row[name] = float(value)
            if "sample_len" in values:
                row["n"] = int(values["sample_len"])
    return table


@dataclass
class TaskRun:
    """What running a list of lm-eval tasks produced."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def sample_rows(samples: list[dict]) -> list[dict]:
    """Per-doc records worth keeping: prompt, generation settings (of a generated answer), doc, target, the
    (filtered) response and its metrics."""
    rows = []
    for sample in samples:
        arguments = sample.get("arguments") or [[None]]
        settings = arguments[0][1] if len(arguments[0]) > 1 and isinstance(arguments[0][1], dict) else None
        rows.append(
            {
                "doc_id": sample.get("doc_id"),
                "prompt": arguments[0][0],  # the context the model saw (of the first request)
                "generation_kwargs": settings,  # what lm-eval generated with; None for loglikelihood tasks
                "target": sample.get("target"),
                "response": sample.get("filtered_resps"),
                "metrics": {m: sample.get(m) for m in sample.get("metrics", [])},
                "doc": sample.get("doc"),
            }
        )
    return rows


def run_tasks(
    lm,
    tasks: Sequence[str],
    manager,
    limit: float | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    apply_chat_template: bool = False,
    keep_going: bool = True,
) -> TaskRun:
    """Evaluate each task (or group) separately on the shared model; failures go to ``skipped``."""
    from lm_eval import simple_evaluate

    if any("ifeval" in task for task in tasks):
        # lm-eval's own IFEval checkers (its `ifeval` task as well as ours) need NLTK's sentence model, which
        # they would try to download; provide it (or the offline fallback) first.
        from eval_harness.ifeval import ensure_sentence_tokenizer

        ensure_sentence_tokenizer()
    run = TaskRun()
    for task in tasks:
        try:
            results = simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=manager,
                limit=limit,
                gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                apply_chat_template=apply_chat_template,
                bootstrap_iters=0,
                log_samples=True,
                num_fewshot=None,
            )
        except Exception as error:
            if not keep_going:
                raise
            LOGGER.warning("task %s skipped: %s", task, error)
            run.skipped[task] = f"{type(error).__name__}: {error}"[:500]
            continue
        if results is None:  # another process of a data-parallel run: lm-eval gathers the results on rank 0
            continue
        run.metrics.update(metrics_of(results))
        for name, samples in (results.get("samples") or {}).items():  # in document order, however many processes
            run.samples[name] = sample_rows(sorted(samples, key=lambda sample: sample.get("doc_id") or 0))
    return run
