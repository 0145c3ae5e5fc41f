"""The runners behind ``milora eval --suite ...``, one module per kind of evaluation.

Each module offers ``add_arguments(parser)`` (its argument group: the flags of its suites) and a ``run(args,
output_dir) -> SuiteResult`` per suite (`lm_eval_suite.SUITES`: one `LmEvalSuite` value per suite, carrying its
tasks); heavy imports (torch, lm-eval, alpaca_eval) happen inside ``run``.

- `lm_eval_suite`: commonsense, math, gsm8k, competition_math, ifeval and any lm-eval tasks (lm_eval);
- `alpaca_eval_suite`, `followbench_suite`: open-ended generation judged on an OpenAI-compatible server
  (shared pieces in `open_ended`);
- `vqa_suite`: one LLaVA benchmark from a local file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SuiteResult:
    """Metrics per task, what was skipped and why, where each task's data came from, per-item records."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    data_sources: dict[str, str] = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)
