"""Time MiLoRA's decomposition against the official per-matrix full SVD on LLaMA-2-7B-shaped weights.

Random weights are fine: the cost depends on the shapes only. Prints one table:

- per shape: the official full SVD (`torch.linalg.svd` in float32, as the paper's code runs it), the
  `gram` method (float64 eigh of the smaller Gram matrix), ours (`auto`: shifted block inverse iteration
  on the Gram matrix on GPU, see milora/decomposition.py), the speedup, and whether the iteration
  converged without falling back to `eigh`;
- the subspace overlap ||Q_ours^T Q_ref||_F^2 / r of our r minor singular vectors with those of a float64
  full SVD (1.0 = the same subspace);
- end to end: `apply_milora` on a LLaMA-2-7B-shaped model (q,k,v,up,down x 32 layers, r=64 -> 160
  matrices) on the GPU, against the full-SVD time of those 160 matrices.

    python benchmarks/init_speed.py                  # the recorded configuration
    python benchmarks/init_speed.py --layers 2       # quick look
    python benchmarks/init_speed.py --preset 70b --out OUT   # LLaMA-2-70B shapes, weights in CPU and in GPU
                                                             # memory, 4 layers projected to 80 (init_placements.py)
    python benchmarks/init_speed.py --preset 70b --layers 80 --no_profile   # all 400 matrices, no projection
    python benchmarks/init_speed.py --preset 70b --device cpu   # the same code on small shapes, on the CPU

milora must be importable (installed, or the repository root on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from milora.decomposition import (
    _minor_components_by_subspace_iteration,
    singular_components,
    smaller_gram,
    subspace_overlap,
)
from milora.io import write_json

# (name, out_features, in_features) of LLaMA-2-7B's targeted projections
SHAPES = {"q/k/v_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
PER_LAYER = {"q/k/v_proj": 3, "up_proj": 1, "down_proj": 1}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def official_full_svd(weight, r):
    # the paper's code: a full SVD per matrix in float32, then slicing the last r triplets
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return U[:, -r:], S[-r:], Vh[-r:]


def per_shape_rows(device, r, repeats, dtype):
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for name, (out_f, in_f) in SHAPES.items():
        weight = (torch.randn(out_f, in_f, generator=generator, device=device) * 0.02).to(dtype)
        official_full_svd(weight, r)  # warm-up: handles, workspaces
        singular_components(weight, r, "minor")
        singular_components(weight, r, "minor", solver="gram")
        t_svd = timed(partial(official_full_svd, weight, r), device, repeats)
        t_gram = timed(partial(singular_components, weight, r, "minor", solver="gram"), device, repeats)
        t_ours = timed(partial(singular_components, weight, r, "minor"), device, repeats)
        ours = singular_components(weight, r, "minor")
        converged = _minor_components_by_subspace_iteration(weight, *smaller_gram(weight), r) is not None
        reference = singular_components(weight, r, "minor", solver="svd")  # float64 full SVD
        official_U = official_full_svd(weight, r)[0]
        rows.append({
            "shape": name, "out": out_f, "in": in_f, "count_per_layer": PER_LAYER[name],
            "full_svd_s": t_svd, "gram_eigh_s": t_gram, "ours_s": t_ours, "speedup": t_svd / t_ours,
            "subspace_converged": converged,
            "overlap_ours_vs_fp64_U": subspace_overlap(ours.U, reference.U),
            "overlap_ours_vs_fp64_V": subspace_overlap(ours.Vh.T, reference.Vh.T),
            "overlap_official_fp32_vs_fp64_U": subspace_overlap(official_U, reference.U),
            "product_rel_err_vs_fp64": float(
                (ours.product() - reference.product()).norm() / reference.product().norm()),
        })
    return rows


def rebuild_rotary_embedding(model, config, device):
    """A Llama built on the meta device, or moved with `to_empty`, has no values in its buffers: rebuild the rotary
    embedding (its inv_freq) on `device`."""
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)


def random_llama(config, dtype, device):
    """A LlamaForCausalLM of `config` with N(0, 0.02) weights, built straight on `device` (no CPU copy)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    rebuild_rotary_embedding(model, config, device)  # to_empty leaves buffers uninitialised
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    return model


LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama2_7b_shaped(layers, dtype, device):
    from transformers import LlamaConfig

    return random_llama(LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}), dtype, device)


def end_to_end(device, layers, r, dtype):
    from milora import apply_milora

    model = llama2_7b_shaped(layers, dtype, device)
    sync(device)
    start = time.perf_counter()
    peft_model = apply_milora(model, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], r, method="milora")
    sync(device)
    seconds = time.perf_counter() - start
    matrices = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    del peft_model, model
    return seconds, matrices


def override_constant(parser, option: str) -> None:
    """Set `NAME=VALUE` (a Python literal) on milora.decomposition, for trials of its solver constants."""
    import ast

    import milora.decomposition as decomposition

    name, _, value = option.partition("=")
    if not (name.isupper() and hasattr(decomposition, name)):
        parser.error(f"--solver_option: milora.decomposition has no constant {name}")
    setattr(decomposition, name, ast.literal_eval(value))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="7b", choices=["7b", "70b"],
                        help="7b: the per-shape table and 160 matrices; 70b: see init_placements.py")
    parser.add_argument("--layers", type=int, default=None, help="default: 32 (7b), 4 (70b)")
    parser.add_argument("--out", default=None, help="70b: write init_70b.json here")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--workers", type=int, default=None, help="70b: decompositions in flight on the GPU")
    parser.add_argument("--placements", default="cpu,gpu", choices=["cpu,gpu", "cpu", "gpu"],
                        help="70b: where the weights live in the timed runs")
    parser.add_argument("--no_profile", action="store_true", help="70b: skip the per-shape phases and kernels")
    parser.add_argument("--busy", action="store_true",
                        help="70b: also profile one run with the weights on the GPU: how busy the GPU is")
    parser.add_argument("--solver_option", action="append", default=[], metavar="NAME=VALUE",
                        help="override a milora.decomposition constant, e.g. GRAM_BLOCK=1024 (repeatable)")
    args = parser.parse_args()
    for option in args.solver_option:
        override_constant(parser, option)
    if args.preset == "70b":
        import init_placements

        args.layers = args.layers or 4
        record = init_placements.run(args)
        if args.out:
            write_json(f"{args.out}/init_70b.json", record)
        return
    args.layers = args.layers or 32
    dtype = getattr(torch, args.dtype)

    rows = per_shape_rows(args.device, args.r, args.repeats, dtype)
    full_svd_total = sum(row["full_svd_s"] * row["count_per_layer"] * args.layers for row in rows)
    ours_total_est = sum(row["ours_s"] * row["count_per_layer"] * args.layers for row in rows)
    e2e_seconds, matrices = end_to_end(args.device, args.layers, args.r, dtype)

    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"\ndevice: {device_name}   torch {torch.__version__}   r={args.r}   weights {args.dtype}")
    print(f"{'shape':<12}{'out x in':>14}{'full SVD s':>12}{'gram s':>9}{'ours s':>10}{'speedup':>9}"
          f"{'overlap U':>11}{'overlap V':>11}{'fp32 SVD ovl':>14}{'converged':>10}")
    for row in rows:
        print(f"{row['shape']:<12}{row['out']:>7}x{row['in']:<6}{row['full_svd_s']:>12.3f}{row['gram_eigh_s']:>9.4f}"
              f"{row['ours_s']:>10.4f}"
              f"{row['speedup']:>8.1f}x{row['overlap_ours_vs_fp64_U']:>11.6f}{row['overlap_ours_vs_fp64_V']:>11.6f}"
              f"{row['overlap_official_fp32_vs_fp64_U']:>14.6f}{str(row['subspace_converged']):>10}")
    print(f"\n{matrices} matrices ({args.layers} layers x q,k,v,up,down):")
    print(f"  official full SVD, per-matrix time x count : {full_svd_total:8.2f} s")
    print(f"  ours, per-matrix time x count              : {ours_total_est:8.2f} s")
    print(f"  ours, apply_milora end to end (PEFT wrap, residual write-back included): {e2e_seconds:8.2f} s")
    print(f"  speedup end to end vs full SVD             : {full_svd_total / e2e_seconds:8.1f}x")
    if args.json:
        write_json(args.json, {"device": device_name, "rows": rows, "full_svd_total_s": full_svd_total,
                               "ours_end_to_end_s": e2e_seconds, "matrices": matrices, "layers": args.layers})


if __name__ == "__main__":
    main()
