"""`milora analyze`: command-line front end of `milora.analysis.report.analyze` (argument parsing only)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
What a finetune learned and how much it forgot (MiLoRA paper, section 5): spectra of the weights with the
principal/minor split at r, normalized subspace similarity between the update dW = W_tuned - W_base and the
top / bottom / random singular vectors of W, the amplification factor, and the forgetting loss on a text corpus.
Writes report.json, spectra.json and PNG plots to --out.

Model arguments may be merged checkpoints (directory or hub id), tiny:<kind>, PEFT adapter directories
(merged in memory onto --base), or `milora init` directories (residual base + milora_init/ adapter: as --base
they stand for the original weights; an adapter trained from them is merged onto the residual)."""

EXAMPLES = """\
examples:
  milora analyze --base meta-llama/Llama-2-7b-hf --tuned outputs/merged --out analysis/
  milora analyze --base outputs/init --tuned outputs/run/checkpoint-1000 --out analysis/ --targets q_proj,v_proj
  milora analyze --base tiny:llama --tuned tuned_dir --forgetting_data notes.txt --max_samples 16 --out a/"""


def build_parser() -> argparse.ArgumentParser:
    from milora.analysis.forgetting import DEFAULT_FORGETTING_DATA

    parser = argparse.ArgumentParser(
        prog="milora analyze", description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help="base model: checkpoint dir, hub id, tiny:<kind>, or a `milora init` directory")
    parser.add_argument("--tuned", default=None,
                        help="finetuned model: merged checkpoint, PEFT adapter dir (merged onto --base), "
                             "or `milora init` dir")
    parser.add_argument("--adapter", default=None,
                        help="PEFT adapter merged onto --tuned (or onto the raw --base when --tuned is not given)")
    parser.add_argument("--out", required=True, help="output directory for report.json and the plots")
    parser.add_argument("--r", type=int, default=None,
                        help="rank of the principal/minor split and of the compared subspaces "
                             "(default: the adapter's rank if known, else 8)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names or name suffixes to analyse, e.g. q_proj,v_proj "
                             "(default: every linear weight the finetune changed)")
    parser.add_argument("--layers", default=None, help="layer indices to analyse, e.g. 0,5,10-12 (default: all)")
    parser.add_argument("--forgetting_data", default=DEFAULT_FORGETTING_DATA,
                        help="text file (.txt, or .jsonl/.json with a text field) or hub dataset NAME[:CONFIG[:SPLIT]] "
                             f"for the forgetting loss; 'none' to skip (default: {DEFAULT_FORGETTING_DATA}; "
                             "skipped with a warning when it cannot be loaded)")
    parser.add_argument("--max_samples", type=int, default=64,
                        help="number of token blocks of --seq_len tokens for the forgetting loss (default: 64)")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per block (default: 512)")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64", "auto"),
                        help="dtype the models are loaded and merged in (default: float32; bfloat16 halves memory "
                             "but adds rounding noise to dW)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baselines (default: 0)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # argparse exits on --help and on usage errors; return its status instead
        args = parser.parse_args(argv)
        if args.tuned is None and args.adapter is None:
            parser.error("give --tuned and/or --adapter")
        for name in ("r", "max_samples", "seq_len", "batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name} must be at least 1")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2

    from milora.analysis.report import analyze
    from milora.commands.arguments import check_model_argument

    for flag, value in (("--base", args.base), ("--tuned", args.tuned)):
        if value is not None:
            check_model_argument(flag, value)
    # Bad input raises (AnalysisInputError, FileNotFoundError, ...); `milora` reports it as one line, status 2.
    report = analyze(
        base=args.base, tuned=args.tuned, adapter=args.adapter, out_dir=args.out, r=args.r,
        targets=args.targets, layers=args.layers, forgetting_data=args.forgetting_data,
        max_samples=args.max_samples, seq_len=args.seq_len, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, seed=args.seed, show_progress=not args.no_progress)
    summary = report["selection"]["selected"]
    forgetting = report["forgetting"] or {}
    line = f"milora analyze: {summary} weights analysed (r = {report['r']})"
    if forgetting.get("forgetting_loss") is not None:
        line += f", forgetting loss {forgetting['forgetting_loss']:.6g} over {forgetting['num_tokens']} tokens"
    print(f"{line}; report: {args.out}/report.json")
    return 0


if __name__ == "__main__":
    from milora.cli import main as milora_main

    sys.exit(milora_main(["analyze", *sys.argv[1:]]))
