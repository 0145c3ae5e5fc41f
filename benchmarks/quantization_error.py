"""Quantization error of 4-bit bases over every adapted matrix of a model: QLoRA, QPiSSA (0 and N refits), QMiLoRA
(0 and N refits), and how far the refits move MiLoRA's factors out of the minor subspace. Runs on CPU.

    python benchmarks/quantization_error.py --model SmolLM2-135M-Instruct.Q4_1.gguf --r 64 --out results/qerr
    # or split over processes: --shard 0/2 and --shard 1/2 into the same --out (the last one prints the table)

For each adapted weight `W` (out x in) and each variant, with factors `B A` (scaling 1) and the residual stored
in `--dtype` and quantized by bitsandbytes (`--quant_type`, block size 64):

    error = ||W - (dequant(Q(W - B A)) + B A)||_F / ||W||_F

QLoRA has `B A = 0`. The table gives the error over all matrices together (square root of the summed squared
errors over the summed ||W||^2), the mean of the per-matrix errors, and the change against QLoRA. For the refitted
MiLoRA factors it also gives their subspace overlap (`milora.decomposition.subspace_overlap`, 1 = same column
space) with the minor singular vectors they started from and with the principal ones of the quantization error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milora.decomposition import SingularComponents, lora_factors, singular_components, subspace_overlap  # noqa: E402
from milora.quantization import FourBitSettings, quantization_error, quantize_dequantize, refit_factors  # noqa: E402

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"


def target_weights(model, targets: list[str]):
    """(name, weight) of every linear layer whose name ends in one of `targets`."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            yield name, module.weight.detach()


def residual_error(w64, B, A, settings, dtype):
    """(squared error, squared norm) of the 4-bit model dequant(Q(W - B A)) + B A."""
    residual = w64 if B is None else w64 - B @ A
    dequantized = quantize_dequantize(residual.to(dtype), settings).to(torch.float64)
    return quantization_error(w64, dequantized, B, A)


def measure_matrix(weight, r, iterations, settings, dtype, milora_refits: bool = True) -> dict:
    """The variants' squared errors for one matrix, and (`milora_refits`) the MiLoRA refits' subspace overlaps."""
    w64 = weight.to(torch.float64)
    U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
    n = S.shape[0]
    principal = SingularComponents(U[:, :r], S[:r], Vh[:r], torch.arange(r))
    minor = SingularComponents(U[:, n - r:], S[n - r:], Vh[n - r:], torch.arange(n - r, n))
    rows = {"qlora": residual_error(w64, None, None, settings, dtype)}
    overlaps = None
    for label, components in (("qpissa", principal), ("qmilora", minor)):
        B, A = lora_factors(components)
        rows[f"{label}_0"] = residual_error(w64, B, A, settings, dtype)
        if label == "qmilora" and not milora_refits:
            break
        B, A = refit_factors(w64, B, A, 1.0, iterations, settings, dtype)
        rows[f"{label}_{iterations}"] = residual_error(w64, B, A, settings, dtype)
        if label == "qmilora":
            lost = w64 - quantize_dequantize(w64.to(dtype), settings).to(torch.float64)
            error_directions = singular_components(lost, r, "principal", solver="gram").U
            overlaps = {"with_minor": subspace_overlap(B, minor.U), "with_error_principal":
                        subspace_overlap(B, error_directions), "with_principal": subspace_overlap(B, principal.U)}
    return {"errors": rows, "overlaps": overlaps}


def summarize(per_matrix: dict, iterations: int) -> list[dict]:
    """One row per variant over every matrix it was measured on (the refitted MiLoRA: `--milora_refit_every`), with
    QLoRA over the same matrices as the reference."""
    variants = ["qlora", "qpissa_0", f"qpissa_{iterations}", "qmilora_0", f"qmilora_{iterations}"]
    table = []
    for variant in variants:
        measured = [m["errors"] for m in per_matrix.values() if variant in m["errors"]]
        norm = sum(e["qlora"][1] for e in measured)
        total = (sum(e[variant][0] for e in measured) / norm) ** 0.5
        reference = (sum(e["qlora"][0] for e in measured) / norm) ** 0.5
        mean = sum((e[variant][0] / e[variant][1]) ** 0.5 for e in measured) / len(measured)
        table.append({"variant": variant, "matrices": len(measured), "error": total, "mean_matrix_error": mean,
                      "vs_qlora": total / reference - 1})
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, directory, .gguf file or tiny:KIND")
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5, help="QPiSSA refits (default: %(default)s, the paper's)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the residual is stored in before quantizing")
    parser.add_argument("--quant_type", default="nf4")
    parser.add_argument("--nested", action="store_true", help="double quantization of the block scales")
    parser.add_argument("--milora_refit_every", type=int, default=1,
                        help="refit MiLoRA's factors (the overlap measurement) on every k-th matrix only")
    parser.add_argument("--shard", default="0/1", help="I/N: measure matrices I, I+N, ... (several processes; the "
                        "table is printed once every shard's file is in --out)")
    parser.add_argument("--out", required=True, help="folder for the per-matrix results and quantization_error.json")
    args = parser.parse_args(argv)

    from milora.loading import load_model, resolve_dtype

    torch.set_num_threads(1)
    dtype = resolve_dtype(args.dtype)
    settings = FourBitSettings(args.quant_type, nested=args.nested)
    index, count = (int(x) for x in args.shard.split("/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, dtype=torch.float32)
    start = time.perf_counter()
    per_matrix = {}
    for position, (name, weight) in enumerate(target_weights(model, args.targets.split(","))):
        if position % count == index:
            per_matrix[name] = measure_matrix(weight, args.r, args.iterations, settings, dtype,
                                              milora_refits=position % args.milora_refit_every == 0)
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    (out / f"matrices_{index}of{count}.json").write_text(json.dumps(per_matrix))
    shards = [out / f"matrices_{i}of{count}.json" for i in range(count)]
    if not all(path.is_file() for path in shards):
        print(f"shard {args.shard} done; the table follows once every shard is in {out}")
        return 0
    per_matrix = {name: m for path in shards for name, m in json.loads(path.read_text()).items()}
    report(per_matrix, args)
    return 0


def report(per_matrix: dict, args) -> None:
    table = summarize(per_matrix, args.iterations)
    refitted = [m["overlaps"] for m in per_matrix.values() if m["overlaps"]]
    overlaps = {key: sum(o[key] for o in refitted) / len(refitted)
                for key in ("with_minor", "with_error_principal", "with_principal")}
    print(f"{len(per_matrix)} matrices of {args.model}, r={args.r}, {args.quant_type}"
          f"{' nested' if args.nested else ''}, residual in {args.dtype}")
    print("| variant | matrices | error ||W - (deq(Q(W_res)) + BA)|| / ||W|| | mean per matrix | vs QLoRA |")
    print("|---|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['variant']} | {row['matrices']} | {row['error']:.5f} | {row['mean_matrix_error']:.5f} | "
              f"{100 * row['vs_qlora']:+.2f}% |")
    print(f"MiLoRA factors after {args.iterations} refits ({len(refitted)} matrices), mean subspace overlap: with the "
          f"minor components {overlaps['with_minor']:.4f}, with the quantization error's principal components "
          f"{overlaps['with_error_principal']:.4f}, with W's principal components {overlaps['with_principal']:.4f}")
    (Path(args.out) / "quantization_error.json").write_text(json.dumps(
        {"args": vars(args), "table": table, "milora_refit_overlaps": overlaps, "matrices": len(per_matrix)},
        indent=2))


if __name__ == "__main__":
    sys.exit(main())
