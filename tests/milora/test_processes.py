"""Merging from a full state dict, as after DeepSpeed ZeRO-3 training (the multi-process runs themselves are in
tests/recipes/test_multiprocess.py)."""

import pytest
import torch

from milora import apply_milora, processes
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS, relative_error


@pytest.mark.parametrize("kind,targets", [("llama", LLAMA_TARGETS), ("gpt2", ["c_attn", "c_fc"])])
def test_merged_state_dict_is_the_merged_model(kind, targets, input_ids, tmp_path, tokenizer):
    """What merge after ZeRO-3 writes, from a full state dict (here the model's own): W + s B A in the base
    model's names (GPT-2's Conv1D transposed), the trained copy of modules_to_save, reloadable."""
    from transformers import AutoModelForCausalLM

    to_save = ["lm_head"] if kind == "llama" else None
    peft_model = apply_milora(tiny_model(kind), targets, 4, show_progress=False, modules_to_save=to_save).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(0.01 * torch.randn_like(param))  # a trained-looking adapter and head
        expected = peft_model(input_ids).logits
    merged = processes.merged_state_dict(peft_model, peft_model.state_dict())
    plain = tiny_model(kind).eval()
    assert sorted(merged) == sorted(plain.state_dict())
    out = processes.save_merged_from_state_dict(peft_model, peft_model.state_dict(), tmp_path / "merged", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert relative_error(reloaded(input_ids).logits, expected) <= 1e-5


def test_end_processes_destroys_the_process_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    processes.end_processes()  # no process group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        processes.end_processes()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from milora.processes import exit_process

out = Path(sys.argv[1])

class Teardown:  # what the interpreter's teardown runs (the module's globals are released)
    def __init__(self, path):
        self.path = str(path)

    def __del__(self, open=open):  # the builtins may be gone by then
        with open(self.path, "w") as file:
            file.write("ran")

held_until_teardown = Teardown(out / "teardown")
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("ran"))).start()
print("buffered", end="")
exit_process(int(sys.argv[2]))
"""


@pytest.mark.parametrize("launched,status", [(True, 0), (True, 3), (False, 0)])
def test_exit_process_skips_only_the_teardown_of_a_launched_process_that_succeeded(tmp_path, launched, status):
    """A process launched as one of several that succeeded ends without the interpreter's teardown (where native
    threads of the communication libraries can abort it), but after its non-daemon threads, its exit handlers and
    its buffered output; any other exit is `sys.exit`'s."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "LOCAL_RANK")}
    if launched:
        env.update(WORLD_SIZE="2", LOCAL_RANK="0", RANK="0")
    result = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), str(status)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr
    assert result.stdout == "buffered"
    assert (tmp_path / "thread").is_file() and (tmp_path / "atexit").is_file()
    assert (tmp_path / "teardown").is_file() == (not launched or status != 0)
