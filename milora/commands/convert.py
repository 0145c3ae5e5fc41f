"""`milora convert`: a trained MiLoRA/PiSSA adapter -> a standard rank-2r LoRA for the ORIGINAL base."""

from __future__ import annotations

import argparse

from milora.commands.arguments import check_adapter_dir, check_model_argument
from milora.layout import INIT_ADAPTER_DIR, INIT_SUBDIR, RESIDUAL_ADAPTER_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milora convert",
        description="Turn an adapter trained on a residual base into a standard LoRA adapter (rank 2r) that "
        "applies to the original base model, so it can be shared and loaded like any LoRA. A recipe run writes "
        "this conversion itself, at the root of its output directory.",
    )
    parser.add_argument("--adapter", required=True,
                        help=f"trained adapter directory (recipe: OUTPUT/{RESIDUAL_ADAPTER_DIR})")
    parser.add_argument("--initial_adapter", required=True,
                        help=f"the adapter as initialised (recipe: OUTPUT/{INIT_ADAPTER_DIR}; "
                             f"init dir: DIR/{INIT_SUBDIR})")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--base", default=None,
                        help="the original model (hub id, directory or tiny:KIND): checked against the fingerprint "
                             "recorded with the adapter before anything is written, and named in the output's config")
    parser.add_argument("--dtype", default="auto", help="dtype to load --base in: auto, bfloat16, float16, float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_adapter_dir("--adapter", args.adapter)
    check_adapter_dir("--initial_adapter", args.initial_adapter)
    from milora.conversion import convert_to_lora

    if args.base is not None:
        check_model_argument("--base", args.base)
        from milora.fingerprint import check_original_base
        from milora.loading import load_model

        base = load_model(args.base, dtype=args.dtype)
        print(f"milora convert: {check_original_base(base, args.adapter, args.base)}")
    convert_to_lora(args.adapter, args.initial_adapter, args.out, base_model_name_or_path=args.base)
    print(f"milora convert: standard LoRA adapter for the original base in {args.out}")
    return 0
