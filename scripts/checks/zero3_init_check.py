"""Check: `apply_milora` on a model partitioned by DeepSpeed ZeRO-3 gives the same adapters and residual
weights as a plain single-process init, on every rank.

    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml --num_processes N \
        scripts/checks/zero3_init_check.py [--kind llama] [--r 4]

Each rank compares its gathered parameters with a reference computed without DeepSpeed and prints the
largest difference; the script exits non-zero if any exceeds the tolerance. It needs milora importable
(installed, or the repository root on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from milora.io import read_json

ROOT = Path(__file__).resolve().parents[2]

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def adapter_and_residual(peft_model) -> dict[str, torch.Tensor]:
    import deepspeed

    state = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name or ".base_layer." in name:
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().float().cpu().clone()
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="llama")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from milora import apply_milora
    from milora.tiny import tiny_model

    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    checkpoint = Path(tempfile.gettempdir()) / f"zero3_check_{args.kind}"
    if rank == 0:
        tiny_model(args.kind).save_pretrained(checkpoint)
    torch.distributed.barrier()

    reference = apply_milora(
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device), TARGETS, args.r,
        show_progress=False,
    )
    expected = {n: p.detach().float().cpu() for n, p in reference.named_parameters()
                if ".lora_" in n or ".base_layer." in n}

    ds_config = read_json(ROOT / "deepspeed_configs" / "ds_zero3.json")
    ds_config.update({"train_micro_batch_size_per_gpu": 1, "train_batch_size": torch.distributed.get_world_size(),
                      "gradient_accumulation_steps": 1, "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    ds_config.pop("gradient_clipping", None)
    # a persistence threshold of 0 partitions even the tiny model's small weights
    ds_config["zero_optimization"].update(
        reduce_bucket_size=1e6, stage3_prefetch_bucket_size=1e6, stage3_param_persistence_threshold=0
    )
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (from_pretrained partitions while this lives)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id") and p.numel() == 0]
    peft_model = apply_milora(model, TARGETS, args.r, show_progress=rank == 0)
    found = adapter_and_residual(peft_model)

    worst = max(float((found[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12))
                for n in expected)
    print(f"rank {rank}: {len(partitioned)} partitioned weights, {len(expected)} tensors compared, "
          f"max relative difference {worst:.2e}", flush=True)
    return 0 if worst <= args.tolerance and set(found) == set(expected) else 1


if __name__ == "__main__":
    sys.exit(main())
