"""Where each evaluation reads its data: an explicit file flag, else a data folder, else the Hugging Face hub.

The data folder comes from ``--data_dir`` or, when that is not given, the ``MILORA_EVAL_DATA`` environment
variable. It is laid out like this (every entry optional; a missing one means the hub copy):

    gsm8k_test.jsonl                              GSM8K test set (question / answer)
    math/math_test.jsonl                          MATH test set (problem / solution)
    commonsense/<set>/test.json                   LLM-Adapters' dataset/ folders (boolq, piqa, ARC-Easy, ...)
    ifeval/input_data.jsonl                       IFEval prompts (key / prompt / instruction_id_list / kwargs)
    followbench/*_constraints.json                FollowBench rows (example_id / category / level / instruction)
    alpaca_eval/gpt4_1106_preview_outputs.json    AlpacaEval 2 instructions with the reference outputs

An explicit flag (``--gsm8k_file`` ...) wins over the folder; the value ``hub`` forces the hub copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from eval_harness.commonsense import LLM_ADAPTERS_DIR_NAMES
from eval_harness.errors import UsageError

DATA_DIR_ENV = "MILORA_EVAL_DATA"
HUB = "hub"
DATA_LAYOUT = {
    "gsm8k": "gsm8k_test.jsonl",
    "math": "math/math_test.jsonl",
    "commonsense": "commonsense",
    "ifeval": "ifeval/input_data.jsonl",
    "followbench": "followbench",
    "alpaca_eval": "alpaca_eval/gpt4_1106_preview_outputs.json",
}


def data_root(data_dir: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The data folder: ``--data_dir``, else ``$MILORA_EVAL_DATA``, else None (the hub)."""
    chosen, origin = (data_dir, "--data_dir") if data_dir else (environ.get(DATA_DIR_ENV), DATA_DIR_ENV)
    if not chosen:
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"{origin} {chosen} is not a folder",
            "give a folder laid out as eval_harness/README.md describes, or leave it unset to read the hub",
        )
    return root.resolve()


def resolve_data_path(name: str, explicit: str | None, flag: str, root: Path | None) -> Path | None:
    """The local file (or folder) for one data set, or None for the hub copy.

    ``explicit`` is the value of the data set's own flag (``flag``, named in errors): a path, or ``hub``.
    """
    if explicit == HUB:
        return None
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise UsageError(f"{flag} {explicit} does not exist", f"give an existing path, or '{HUB}' for the hub copy")
        return path.resolve()
    if root is not None:
        candidate = root / DATA_LAYOUT[name]
        if candidate.exists():
            return candidate.resolve()
    return None


def commonsense_test_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Commonsense set name -> its LLM-Adapters ``<folder>/test.json`` (or ``<folder>.json``) under directory."""
    found = {}
    for name, folder in LLM_ADAPTERS_DIR_NAMES.items():
        for candidate in (Path(directory) / folder / "test.json", Path(directory) / f"{folder}.json"):
            if candidate.is_file():
                found[name] = candidate.resolve()
                break
    if not found:
        raise UsageError(
            f"no LLM-Adapters test files under {directory}",
            "point --commonsense_dir at LLM-Adapters' dataset/ folder (<set>/test.json, e.g. boolq/test.json)",
        )
    return found
