"""`milora init` file by file (`milora.sharded_init`): the same directory as the in-memory init, with a peak memory
that does not grow with the checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from milora.commands import init as init_command
from milora.errors import MiLoRAError
from milora.init_dir import load_init_dir, read_init_record
from milora.sharded_init import checkpoint_files, init_by_shards, shardable_reason

LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=261)


def save_checkpoint(model, path, dtype=torch.float32, max_shard_size="60KB"):
    torch.manual_seed(0)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return str(path)


def llama_checkpoint(path, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return save_checkpoint(LlamaForCausalLM(LlamaConfig(**LLAMA)), path, dtype, **kwargs)


def state(init_dir):
    model = load_init_dir(init_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("dtype", "method"), [(torch.float32, "milora"), (torch.bfloat16, "random")])
def test_sharded_llama_init_equals_the_in_memory_init(tmp_path, dtype, method):
    source = llama_checkpoint(tmp_path / "source", dtype)
    assert len(checkpoint_files(Path(source))) > 5
    common = ["--model", source, "--r", "4", "--method", method, "--lora_alpha", "8"]
    assert init_command.main([*common, "--out", str(tmp_path / "shards")]) == 0
    assert init_command.main([*common, "--out", str(tmp_path / "memory"), "--in_memory"]) == 0
    # the file-by-file init kept the checkpoint's files; the in-memory one wrote its own
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors")) == sorted(
        p.name for p in Path(source).glob("*.safetensors"))
    shards, memory = state(tmp_path / "shards"), state(tmp_path / "memory")
    assert sorted(shards) == sorted(memory)
    for name, tensor in memory.items():
        assert shards[name].dtype == tensor.dtype
        assert torch.equal(shards[name], tensor), name
    original = LlamaForCausalLM.from_pretrained(source).state_dict()
    changed = [n for n in memory if ".base_layer." in n and not torch.equal(
        memory[n], original[n.removeprefix("base_model.model.").replace(".base_layer", "")])]
    assert len(changed) == 3 * 5  # every target is a residual now
    assert read_init_record(tmp_path / "shards") == read_init_record(tmp_path / "memory")


def test_gpt2_conv1d_weights_are_decomposed_transposed(tmp_path):
    torch.manual_seed(0)
    source = save_checkpoint(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=261)),
                             tmp_path / "source", max_shard_size="40KB")
    common = ["--model", source, "--r", "3", "--targets", "c_attn,c_fc"]
    init_command.main([*common, "--out", str(tmp_path / "shards")])
    init_command.main([*common, "--out", str(tmp_path / "memory"), "--in_memory"])
    shards, memory = state(tmp_path / "shards"), state(tmp_path / "memory")
    for name, tensor in memory.items():
        assert torch.equal(shards[name], tensor), name


def test_nan_weight_is_refused_and_nothing_is_written(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
    source = save_checkpoint(model, tmp_path / "source")
    with pytest.raises(MiLoRAError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: the weight holds NaN"):
        init_by_shards(source, tmp_path / "out", "up_proj", 4, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoints_that_cannot_go_file_by_file_are_named(tmp_path):
    assert shardable_reason("tiny:llama") == "not a safetensors checkpoint"
    assert shardable_reason(str(tmp_path)) == "not a local model directory"
    source = llama_checkpoint(tmp_path / "source")
    assert shardable_reason(source) is None
    for file in Path(source).glob("*.safetensors*"):
        file.unlink()
    assert shardable_reason(source) == "no safetensors files"


MEASURE = """
import json, sys
from pathlib import Path
import torch
from milora import apply_milora
from milora.init_dir import save_init_dir
from milora.loading import load_model
from milora.sharded_init import init_by_shards

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def peak_over_start(run):
    start = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    run()
    return status("VmHWM:") - start

def by_shards(source, out):
    return lambda: init_by_shards(source, out, "down_proj", 4, show_progress=False)

def in_memory(source, out):
    return lambda: save_init_dir(apply_milora(load_model(source), "down_proj", 4,
                                              show_progress=False), out)

warm, many, one, out = sys.argv[1:]
torch.set_num_threads(1)  # the measurement needs no speed; one thread keeps it quick on a busy machine
by_shards(warm, out + "/warm-shards")()  # imports and first-use allocations, out of the measurement
in_memory(warm, out + "/warm-memory")()
print(json.dumps({
    "shards_many_files": peak_over_start(by_shards(many, out + "/many")),
    "shards_one_file": peak_over_start(by_shards(one, out + "/one")),
    "in_memory": peak_over_start(in_memory(many, out + "/memory")),
}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.end_to_end
def test_peak_memory_stays_bounded_whatever_the_checkpoint_size(tmp_path):
    llama_checkpoint(tmp_path / "warm")
    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 16})
    model = LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # 63 MB
    save_checkpoint(model, tmp_path / "many", max_shard_size="2MB")
    save_checkpoint(model, tmp_path / "one", max_shard_size="1GB")
    assert len(checkpoint_files(tmp_path / "many")) > 40 and len(checkpoint_files(tmp_path / "one")) == 1
    result = subprocess.run([sys.executable, "-c", MEASURE, *(str(tmp_path / n) for n in ("warm", "many", "one")),
                             str(tmp_path / "out")], capture_output=True, text=True, check=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    # the in-memory init holds the model: the measurement sees it
    assert peaks["in_memory"] > 0.75 * model_bytes, peaks
    # file by file: a fixed allowance (Python and torch allocations, the adapter) plus the matrix in flight,
    # however many files, however large the checkpoint (measured: 15 MB for 4 layers, 20 MB for 16)
    bound = 32 * 2**20
    assert peaks["shards_many_files"] < bound and peaks["shards_one_file"] < bound, peaks
