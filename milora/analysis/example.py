"""Builds the README example of `milora analyze`: a tiny Llama and a constructed MiLoRA-like update.

    python -m milora.analysis.example OUT_DIR [--png docs/images/analysis_example.png]

The "finetune" adds to every attention and MLP weight a rank-r update that lies mostly (by construction)
in the span of the weight's bottom-r singular vectors, plus a small random rank-r part, so the report shows
what a MiLoRA finetune looks like: high similarity to the minor subspace, near-zero to the principal one.
Offline and seeded; takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

EXAMPLE_RANK = 8
EXAMPLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXAMPLE_TEXT = (
    "MiLoRA adapts the minor singular components of each weight matrix and leaves the principal ones, "
    "which hold most of the pretrained knowledge, in place.\n"
    "The forgetting loss compares the next-token distributions of the finetuned model with those of the base.\n"
) * 20


def minor_update(weight: torch.Tensor, r: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """float64 rank-r update: U_minor diag(d) V_minor^T plus `noise` times a random rank-r matrix of the same size."""
    U, S, Vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    magnitudes = torch.linspace(2.0, 1.0, r, dtype=torch.float64) * S[0] * 0.05
    update = U[:, -r:] @ torch.diag(magnitudes) @ Vh[-r:]
    left = torch.randn(weight.shape[0], r, generator=generator, dtype=torch.float64)
    right = torch.randn(r, weight.shape[1], generator=generator, dtype=torch.float64)
    random_part = left @ right
    return update + noise * random_part * (update.norm() / random_part.norm())


def build_example_pair(root: Path) -> tuple[Path, Path, Path]:
    """(base checkpoint dir, tuned checkpoint dir, text file) under `root`."""
    from milora.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer

    base_dir, tuned_dir, text_file = root / "base", root / "tuned", root / "text.txt"
    save_tiny_checkpoint("llama", base_dir)
    tuned = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in EXAMPLE_TARGETS:
                module.weight.add_(minor_update(module.weight, EXAMPLE_RANK, 0.25, generator).to(module.weight.dtype))
    tuned.save_pretrained(tuned_dir)
    tiny_tokenizer().save_pretrained(tuned_dir)
    text_file.write_text(EXAMPLE_TEXT)
    return base_dir, tuned_dir, text_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m milora.analysis.example", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory of the report")
    parser.add_argument("--png", default=None,
                        help="also copy summary.png here (e.g. docs/images/analysis_example.png)")
    parser.add_argument("--summary_only", action="store_true", help="draw summary.png only (faster)")
    args = parser.parse_args(argv)

    from milora.analysis.report import analyze

    with tempfile.TemporaryDirectory() as tmp:
        base_dir, tuned_dir, text_file = build_example_pair(Path(tmp))
        report = analyze(str(base_dir), str(tuned_dir), args.out, r=EXAMPLE_RANK, forgetting_data=str(text_file),
                         max_samples=8, seq_len=128, device="cpu", show_progress=False,
                         plot_names=("summary",) if args.summary_only else None)
    # The temporary paths mean nothing to a reader of the report.
    from milora.analysis.output import write_report_json
    from milora.io import atomic_write_bytes

    report["base"]["model"], report["tuned"]["model"] = "tiny:llama", "tiny:llama + constructed minor update"
    report["forgetting"]["data"] = "example text (milora.analysis.example.EXAMPLE_TEXT)"
    write_report_json(Path(args.out) / "report.json", report)
    if args.png:
        atomic_write_bytes(args.png, (Path(args.out) / "summary.png").read_bytes())
    print(f"example report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
