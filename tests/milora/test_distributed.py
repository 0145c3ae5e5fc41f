"""Split initialisation across processes (torch.distributed, gloo on CPU), DeepSpeed ZeRO-3-partitioned weights
and the on-disk init cache."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from milora import apply_milora, distributed, streaming
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS


def adapter_and_residual_state(peft_model):
    return {
        n: p.detach().clone()
        for n, p in peft_model.named_parameters()
        if ".lora_" in n or ".base_layer." in n
    }


def _count_decompositions() -> list:
    """A list that gets one entry per decomposition this process runs (streaming.singular_components patched)."""
    calls = []
    original = streaming.singular_components

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    streaming.singular_components = counting
    return calls


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    calls = _count_decompositions()
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, show_progress=False)
    torch.save({"state": adapter_and_residual_state(peft_model), "calls": len(calls)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_split_the_work_and_agree(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    layers = 2 * len(LLAMA_TARGETS)
    assert [r["calls"] for r in results] == [layers // 2, layers // 2]  # each matrix decomposed once
    single = adapter_and_residual_state(apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, show_progress=False))
    for name, tensor in single.items():
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name  # ranks identical
        torch.testing.assert_close(results[0]["state"][name], tensor, atol=1e-6, rtol=1e-5)


def test_cache_reuses_factors_and_keys_on_inputs(tmp_path, monkeypatch, input_ids):
    first = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.iterdir())) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("decomposition ran despite a cache hit")

    monkeypatch.setattr(streaming, "singular_components", must_not_run)
    second = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, cache_dir=tmp_path, show_progress=False)
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids).logits, first(input_ids).logits)
    for name, tensor in adapter_and_residual_state(first).items():
        torch.testing.assert_close(adapter_and_residual_state(second)[name], tensor, atol=1e-6, rtol=1e-5)
    monkeypatch.undo()
    # another rank, method or set of weights is another key
    apply_milora(tiny_model("llama"), LLAMA_TARGETS, 2, cache_dir=tmp_path, show_progress=False)
    apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method="pissa", cache_dir=tmp_path, show_progress=False)
    apply_milora(tiny_model("llama", seed=5), LLAMA_TARGETS, 4, cache_dir=tmp_path, show_progress=False)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 4



def _zero3_peft_model(deepspeed, partition_lora: bool):
    """A ZeRO-3-partitioned tiny Llama (as `from_pretrained` leaves it under zero.Init), then MiLoRA's `random`
    mode, whose per-layer seed shows a rank that decomposed a layer as another one."""
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model = tiny_model("llama")
    deepspeed.zero.Init(module=model, config_dict_or_path=config)  # partition the weights in place
    # PEFT creates the LoRA layers after zero.Init (plain tensors), or inside one (partitioned too)
    creation = deepspeed.zero.Init(config_dict_or_path=config) if partition_lora else contextlib.nullcontext()
    with creation:
        return apply_milora(model, LLAMA_TARGETS, 4, method="random", show_progress=False)


def _zero3_worker(rank, world_size, init_file, out_dir):
    import os

    import deepspeed

    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; DeepSpeed reads it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for partition_lora in (False, True):
        peft_model = _zero3_peft_model(deepspeed, partition_lora)
        partitioned = {n: distributed.is_zero3_partitioned(p) for n, p in peft_model.named_parameters()}
        with deepspeed.zero.GatheredParameters(list(peft_model.parameters())):
            results[partition_lora] = {"state": adapter_and_residual_state(peft_model), "partitioned": partitioned}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_zero3_gathered_init_on_two_ranks_equals_single_process(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    mp.spawn(_zero3_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)  # as on the ranks: bitwise equality needs the same float64 arithmetic
    single = adapter_and_residual_state(
        apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method="random", show_progress=False)
    )
    for partition_lora in (False, True):
        partitioned = ranks[0][partition_lora]["partitioned"]
        assert all(v for n, v in partitioned.items() if ".base_layer." in n)  # the gathered path ran
        assert all(v == partition_lora for n, v in partitioned.items() if ".lora_" in n)
        for rank in ranks:  # every rank holds exactly the factors and residuals one process computes
            state = rank[partition_lora]["state"]
            assert sorted(state) == sorted(single)
            for name, tensor in single.items():
                assert torch.equal(state[name], tensor), (partition_lora, name)


def _cache_on_one_node_worker(rank, world_size, init_file, out_dir):
    """Rank 0 sees a filled cache directory, rank 1 an empty one: as nodes that each have a local disk."""
    from datetime import timedelta

    torch.set_num_threads(1)
    # a short timeout: ranks that disagreed about the cache would wait in a broadcast until it expires
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    calls = _count_decompositions()
    cache_dir = f"{out_dir}/cache_node{rank}"
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, cache_dir=cache_dir, show_progress=False)
    torch.save({"state": adapter_and_residual_state(peft_model), "calls": len(calls)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_cache_found_on_one_node_only_is_computed_by_every_rank(tmp_path):
    torch.set_num_threads(1)
    single = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, cache_dir=tmp_path / "cache_node0",
                          show_progress=False)
    mp.spawn(_cache_on_one_node_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    layers = 2 * len(LLAMA_TARGETS)
    assert [r["calls"] for r in results] == [layers // 2, layers // 2]  # the split ran despite rank 0's cache
    for name, tensor in adapter_and_residual_state(single).items():
        for result in results:
            torch.testing.assert_close(result["state"][name], tensor, atol=1e-6, rtol=1e-5)
