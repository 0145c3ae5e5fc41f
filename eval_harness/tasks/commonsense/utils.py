"""lm-eval hooks of the milora commonsense tasks: doc conversion and LLM-Adapters answer scoring.

lm-eval loads this file by path (``!function utils.<name>``); the logic lives in `eval_harness.commonsense`.
"""

import sys
from pathlib import Path

try:
    import eval_harness  # noqa: F401
except ImportError:  # lm_eval run from a checkout without milora installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from eval_harness.commonsense import is_commonsense_correct, to_llm_adapters_doc


def _process_docs(dataset_name):
    def process(dataset):
        return dataset.map(
            lambda row: to_llm_adapters_doc(dataset_name, row),
            remove_columns=list(dataset.column_names),
        )

    return process


def _process_results(dataset_name):
    def process(doc, results):
        return {"acc": is_commonsense_correct(dataset_name, results[0], doc["answer"])}

    return process


process_docs_boolq = _process_docs("boolq")
process_docs_piqa = _process_docs("piqa")
process_docs_social_i_qa = _process_docs("social_i_qa")
process_docs_hellaswag = _process_docs("hellaswag")
process_docs_winogrande = _process_docs("winogrande")
process_docs_arc_easy = _process_docs("arc_easy")
process_docs_arc_challenge = _process_docs("arc_challenge")
process_docs_openbookqa = _process_docs("openbookqa")

process_results_boolq = _process_results("boolq")
process_results_piqa = _process_results("piqa")
process_results_social_i_qa = _process_results("social_i_qa")
process_results_hellaswag = _process_results("hellaswag")
process_results_winogrande = _process_results("winogrande")
process_results_arc_easy = _process_results("arc_easy")
process_results_arc_challenge = _process_results("arc_challenge")
process_results_openbookqa = _process_results("openbookqa")
