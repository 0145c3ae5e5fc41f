"""`milora convert`: a trained MiLoRA/PiSSA adapter -> a standard rank-2r LoRA for the ORIGINAL base."""

from __future__ import annotations

import argparse

from milora.layout import INIT_ADAPTER_DIR, INIT_SUBDIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milora convert",
        description="Turn an adapter trained on a residual base into a standard LoRA adapter (rank 2r) that "
        "applies to the original base model, so it can be shared and loaded like any LoRA.",
    )
    parser.add_argument("--adapter", required=True, help="trained adapter directory")
    parser.add_argument("--initial_adapter", required=True,
                        help=f"the adapter as initialised (recipe: OUTPUT/{INIT_ADAPTER_DIR}; "
                             f"init dir: DIR/{INIT_SUBDIR})")
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from milora.conversion import convert_to_lora

    convert_to_lora(args.adapter, args.initial_adapter, args.out)
    print(f"milora convert: standard LoRA adapter for the original base in {args.out}")
    return 0
