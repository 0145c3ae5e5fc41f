"""`milora merge`: base model + adapter -> one full checkpoint for lm_eval, vLLM, from_pretrained."""

from __future__ import annotations

import argparse

from milora.commands.arguments import check_adapter_dir, check_model_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milora merge",
        description="Merge an adapter into its base model and save a full checkpoint. The base must be the "
        "model the adapter applies to: the `milora init` directory (residual model) for an adapter trained "
        "from it, or the original model for a standard LoRA written by `milora convert`.",
    )
    parser.add_argument("--base", required=True, help="hub id, local directory, or tiny:KIND")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_argument("--base", args.base)
    check_adapter_dir("--adapter", args.adapter)
    from milora.conversion import merge_checkpoint

    merge_checkpoint(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"milora merge: merged checkpoint in {args.out}")
    return 0
