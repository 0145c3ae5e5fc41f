"""Which checkpoint `resume_from_checkpoint: true` resumes from: the newest one that was written whole.

The Trainer writes a checkpoint in place (weights, optimizer state, RNG states) and `trainer_state.json` last,
so a run killed while saving leaves a `checkpoint-N/` without a readable `trainer_state.json`, or with safetensors
files cut short. Such a checkpoint is skipped, with a warning, in favour of the previous complete one.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from milora.io import DamagedFileError, read_json, safetensors_keys

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it was written whole."""
    step = int(CHECKPOINT_NAME.match(checkpoint.name).group(1))
    state_path = checkpoint / TRAINER_STATE_FILE
    if not state_path.is_file():
        return f"no {TRAINER_STATE_FILE} (written last)"
    try:
        state = read_json(state_path)
    except ValueError:
        return f"{TRAINER_STATE_FILE} is cut short"
    if state.get("global_step") != step:
        return f"{TRAINER_STATE_FILE} names step {state.get('global_step')}"
    for path in checkpoint.glob("*.safetensors"):
        try:
            safetensors_keys(path)
        except DamagedFileError:
            return f"{path.name} is damaged"
    latest = checkpoint / "latest"  # DeepSpeed's pointer to its own state folder
    if latest.is_file() and not (checkpoint / latest.read_text().strip()).is_dir():
        return "DeepSpeed's state folder named in `latest` is missing"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that was written whole; None when there is none."""
    candidates = [p for p in Path(output_dir).iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    for checkpoint in sorted(candidates, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)), reverse=True):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return str(checkpoint)
        logger.warning("skipping %s: not written whole (%s); the run stopped while saving it", checkpoint, reason)
    return None


class TrainingAlreadyDone(Exception):
    """Raised by `StopAtMaxSteps` before a step past `max_steps`; `recipes/sft.py` then writes the outputs."""


def stop_at_max_steps_callback():
    """A callback that stops a run resumed from its last checkpoint (killed while writing its outputs) before it
    trains a step more: the Trainer compares `global_step` with `max_steps` only after a step, so a resume from
    step `max_steps` in the middle of an epoch would otherwise end one step further than the run it resumes."""
    from transformers import TrainerCallback

    class StopAtMaxSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise TrainingAlreadyDone(f"the checkpoint is at step {state.global_step}, the last one")

    return StopAtMaxSteps()
