"""`milora init`: decompose once, write the residual base model and the initial adapter.

Training then starts from the directory with no SVD (`milora_init_dir:` in a recipe): the fast path for
repeated runs, under any launcher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from milora.commands.arguments import check_model_argument
from milora.decomposition import DEFAULT_SOLVER, SOLVERS
from milora.errors import MiLoRAError

DEFAULT_METHOD = "milora"  # as apply_milora (milora.model.DEFAULT_METHOD, not imported: it loads torch)
INIT_METHODS = ("milora", "pissa", "mid", "random")  # plain LoRA has nothing to precompute


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milora init",
        description="Precompute a MiLoRA/PiSSA init: residual base model in OUT, initial adapter in OUT/milora_init/.",
    )
    parser.add_argument("--model", required=True, help="hub id, local directory, or tiny:KIND")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj",
                        help="comma-separated module names, a regex, or all-linear (default: %(default)s)")
    parser.add_argument("--r", type=int, required=True, help="adapter rank")
    parser.add_argument("--method", default=None,
                        help=f"the SVD init: {', '.join(INIT_METHODS)} (default: {DEFAULT_METHOD})")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # deprecated alias of --method
    parser.add_argument("--lora_alpha", type=float, default=None, help="default: r (scaling 1)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    parser.add_argument("--device", default=None, help="where to decompose, e.g. cuda (default: the weights' device)")
    parser.add_argument("--solver", "--decomposition", dest="solver", default=DEFAULT_SOLVER, choices=SOLVERS,
                        help="the SVD algorithm, as apply_milora's: auto (subspace iteration for the minor slice on "
                             "a GPU, else gram), gram, svd or subspace; all exact in float64 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random method")
    parser.add_argument("--in_memory", action="store_true",
                        help="load the whole model in memory; by default a local safetensors checkpoint (with "
                             "--dtype auto) is processed file by file, one matrix at a time")
    parser.add_argument("--qpissa_iterations", type=int, default=0,
                        help="refit the factors to a 4-bit residual this many times (QPiSSA; loads the model in "
                        "memory); the residual is saved in full precision, a recipe with load_in_4bit: true "
                        "quantizes it the same way on loading")
    parser.add_argument("--bnb_4bit_quant_type", default="nf4", help="4-bit type the refits assume: nf4 or fp4")
    parser.add_argument("--use_bnb_nested_quant", action="store_true", help="the refits assume nested quantization")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from milora.distributed import adapted_module_names
    from milora.fingerprint import model_fingerprint, write_record
    from milora.init_dir import INIT_SUBDIR, save_init_dir
    from milora.loading import load_model, load_processing_class
    from milora.model import apply_milora, check_method, method_of_mode, resolve_target_modules

    method = check_method(args.method or DEFAULT_METHOD)
    if args.mode is not None:
        method = method_of_mode(args.mode)
        print(f"milora init: --mode is deprecated and goes in the next release; use --method {method}",
              file=sys.stderr)
    if method not in INIT_METHODS:
        raise ValueError(f"plain LoRA needs no precomputed init; use --method {', '.join(INIT_METHODS)}")
    check_model_argument("--model", args.model)
    try:
        processing_class = load_processing_class(args.model)
    except (OSError, ValueError) as error:
        print(f"milora init: no tokenizer/processor saved ({error})")
        processing_class = None
    quantization = None
    if args.qpissa_iterations:
        from milora.quantization import FourBitSettings

        quantization = FourBitSettings(args.bnb_4bit_quant_type, nested=args.use_bnb_nested_quant)
    elif not args.in_memory and args.dtype == "auto" and _init_by_shards(args, method, processing_class):
        # written file by file: no base record (milora_adapter.json), so runs from it check no fingerprint
        print(f"milora init: residual model in {args.out}, initial adapter in {args.out}/{INIT_SUBDIR}")
        return 0
    model = load_model(args.model, dtype=args.dtype)
    try:
        original = model_fingerprint(model, resolve_target_modules(model, args.targets))
    except MiLoRAError:  # weights that are not float: apply_milora below says what to do about them
        original = None
    peft_model = apply_milora(
        model, args.targets, args.r, method=method, lora_alpha=args.lora_alpha,
        device=args.device, solver=args.solver, seed=args.seed,
        quantization=quantization, quantization_iterations=args.qpissa_iterations, quantize_residual=False,
    )
    refit_for = {**quantization.describe(), "iterations": args.qpissa_iterations} if quantization else None
    save_init_dir(peft_model, args.out, processing_class, source_model=args.model, targets=args.targets,
                  solver=args.solver, seed=args.seed, quantization=refit_for)
    lora_alpha = peft_model.peft_config["default"].lora_alpha
    names = adapted_module_names(peft_model)
    write_record(Path(args.out) / INIT_SUBDIR, applies_to="residual", base_model=str(Path(args.out).resolve()),
                 fingerprint=model_fingerprint(peft_model, names), method=method, r=args.r,
                 lora_alpha=lora_alpha, original_model=args.model, original_fingerprint=original)
    print(f"milora init: residual model in {args.out}, initial adapter in {args.out}/{INIT_SUBDIR}")
    return 0


def _init_by_shards(args, method: str, processing_class) -> bool:
    """Write the init directory file by file (`milora.sharded_init`) when the checkpoint allows it; False (and
    nothing written) when it does not."""
    from milora.sharded_init import NotShardable, init_by_shards, shardable_reason

    if shardable_reason(args.model) is not None:
        return False
    try:
        init_by_shards(
            args.model, args.out, args.targets, args.r, method=method, lora_alpha=args.lora_alpha,
            device=args.device, solver=args.solver, seed=args.seed, processing_class=processing_class,
            source_model=args.model,
        )
    except NotShardable as error:
        print(f"milora init: loading the model in memory ({error})")
        return False
    return True
