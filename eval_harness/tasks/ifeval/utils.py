"""lm-eval hooks of the milora_ifeval task: lm-eval's IFEval checkers, usable offline.

lm-eval loads this file by path (``!function utils.<name>``); the logic lives in `eval_harness.ifeval`.
"""

import sys
from pathlib import Path

try:
    import eval_harness  # noqa: F401
except ImportError:  # lm_eval run from a checkout without milora installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from eval_harness.ifeval import aggregate_instruction_level, lm_eval_process_results


def process_results(doc, results):
    return lm_eval_process_results(doc, results)


def agg_inst_level_acc(items):
    return aggregate_instruction_level(items)
