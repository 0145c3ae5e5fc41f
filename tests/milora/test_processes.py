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
