"""Faults injected into real runs, and what survives them (the table in docs/CONTRIBUTING.md).

- A 2-process DeepSpeed ZeRO-2 run (CPU, gloo) killed with SIGKILL during training and during a checkpoint save,
  then resumed with `resume_from_checkpoint: true`: it ends with the uninterrupted run's loss, and never resumes
  from the checkpoint whose save was cut short.
- A run killed while writing `merged/`: the run is not reported done (no `milora_run.json`, no `merged/`), and the
  resumed run writes everything.
- Truncated files: an init directory's weights, an init cache file, an adapter: one line, or the work is redone.

The kills come from a `sitecustomize.py` put on the processes' path: at the chosen step it sends SIGKILL to the
run's whole process group (launcher and both ranks), as a crashed node would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_multiprocess import REPO_ROOT, SAVE_STEPS, STEPS, launch, logged_losses, train_tiny
from .test_multiprocess import pytestmark as MULTIPROCESS_MARKS

pytestmark = MULTIPROCESS_MARKS  # multiprocess, and skipped without DeepSpeed or ninja

KILLER = '''
import os, signal
_fault = os.environ.get("MILORA_TEST_FAULT")
if _fault and os.environ.get("RANK", "0") == "0":
    _kind, _step = _fault.split(":")
    _step = int(_step)

    def _kill_run():
        os.killpg(os.getpgid(0), signal.SIGKILL)

    import transformers

    if _kind == "train":  # before the optimizer step after `_step`
        _original_step = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == _step:
                _kill_run()
            return _original_step(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step
    elif _kind == "save":  # weights and optimizer state written, RNG state and trainer_state.json not yet
        _original_rng = transformers.Trainer._save_rng_state

        def _save_rng_state(self, output_dir):
            if self.state.global_step == _step:
                _kill_run()
            return _original_rng(self, output_dir)

        transformers.Trainer._save_rng_state = _save_rng_state
    elif _kind == "merge":  # merged/ written to its temporary folder, not yet renamed into place
        _original_save = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, save_directory, *args, **kwargs):
            result = _original_save(self, save_directory, *args, **kwargs)
            if ".merged.tmp" in str(save_directory):
                _kill_run()
            return result

        transformers.PreTrainedModel.save_pretrained = save_pretrained
'''


@pytest.fixture(scope="module")
def killer_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("killer")
    (folder / "sitecustomize.py").write_text(KILLER)
    return os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])


def fault_env(killer_path: str, fault: str) -> dict:
    return {"PYTHONPATH": killer_path, "MILORA_TEST_FAULT": fault}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return train_tiny("zero2", tmp_path_factory.mktemp("zero2_whole") / "out")


def killed_then_resumed(killer_path: str, fault: str, out_dir: Path) -> tuple[subprocess.CompletedProcess, str]:
    killed = launch("zero2", "recipes/tiny_milora.yaml", out_dir, "--max_steps", str(STEPS), "--save_steps",
                    str(SAVE_STEPS), extra_env=fault_env(killer_path, fault), expect_success=False)
    assert killed.returncode != 0 and "sft.py: done" not in killed.stdout, killed.stdout[-2000:]
    assert not (out_dir / "milora_run.json").exists()
    resumed = launch("zero2", "recipes/tiny_milora.yaml", out_dir, "--max_steps", str(STEPS), "--save_steps",
                     str(SAVE_STEPS), "--resume_from_checkpoint", "true")
    return killed, resumed.stdout + resumed.stderr


def final_loss(out_dir: Path) -> float:
    return json.loads((out_dir / "milora_run.json").read_text())["final_loss"]


def test_zero2_run_killed_during_training_resumes_to_the_same_loss(uninterrupted, killer_path, tmp_path):
    out_dir = tmp_path / "out"
    killed_then_resumed(killer_path, f"train:{SAVE_STEPS + 1}", out_dir)
    assert final_loss(out_dir) == pytest.approx(final_loss(uninterrupted), abs=1e-6)
    assert logged_losses(out_dir)[STEPS] == pytest.approx(logged_losses(uninterrupted)[STEPS], abs=1e-6)


def test_zero2_run_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(uninterrupted, killer_path,
                                                                                  tmp_path):
    out_dir = tmp_path / "out"
    _, log = killed_then_resumed(killer_path, f"save:{STEPS}", out_dir)
    # the cut-short checkpoint-STEPS was skipped: training resumed from checkpoint-SAVE_STEPS
    assert f"skipping {out_dir / f'checkpoint-{STEPS}'}" in log
    state = json.loads((out_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert final_loss(out_dir) == pytest.approx(final_loss(uninterrupted), abs=1e-6)
    assert (out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()  # written whole by the resumed run


def run_sft(*args: str, env: dict | None = None, expect_success: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "recipes/sft.py", "recipes/tiny_milora.yaml", "--max_steps", "2", "--save_steps", "1",
               "--per_device_train_batch_size", "4", "--effective_batch_size", "4", "--dataset_max_samples", "16",
               "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    if expect_success:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_run_killed_while_writing_merged_is_not_done_and_resume_redoes_it(killer_path, tmp_path):
    out_dir = tmp_path / "out"
    killed = run_sft("--output_dir", str(out_dir), env=fault_env(killer_path, "merge:0"), expect_success=False)
    assert killed.returncode != 0 and "sft.py: done" not in killed.stdout
    assert not (out_dir / "merged").exists() and not (out_dir / "milora_run.json").exists()
    assert list(out_dir.glob(".merged.tmp-*"))  # the cut-short write, never renamed into place
    run_sft("--output_dir", str(out_dir), "--resume_from_checkpoint", "true")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out_dir / "merged")
    assert json.loads((out_dir / "milora_run.json").read_text())["global_step"] == 2
