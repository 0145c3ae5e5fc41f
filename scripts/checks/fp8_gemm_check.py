"""The FP8 frozen linear layer of `fp8_base` (`milora.fp8`) on this machine's device: its forward output and input
gradient against float64 at LLaMA-2-7B's linear shapes and token counts that are and are not multiples of 16, and
the time of forward + input gradient against the same frozen `nn.Linear` in bfloat16.

    python scripts/checks/fp8_gemm_check.py [--tokens 1,7,1000,4096] [--repeats 20] [--out OUT.json]

A GPU of compute capability 8.9 or higher runs it in seconds; on CPU it checks the numbers only (slowly; a
smaller --tokens list). Exits 1 when an error exceeds the bound (relative Frobenius error 0.05; FP8 e4m3 gives
about 0.03).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout without installing

from milora import fp8  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}  # (in, out)
BOUND = 0.05


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref).norm() / ref.norm())


def timed(step, repeats: int, device: torch.device) -> float:
    """Median seconds of `step()` over `repeats` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check(in_features: int, out_features: int, tokens: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    layer.requires_grad_(False)
    layer.weight.copy_(linear.weight)
    layer.__class__ = fp8.Float8FrozenLinear
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=torch.bfloat16)
    weight64 = linear.weight.double()
    out = layer(x)
    out.backward(grad)
    row = {"in": in_features, "out": out_features, "tokens": tokens,
           "forward_error": relative_error(out, x.double() @ weight64.t()),
           "input_grad_error": relative_error(x.grad, grad.double() @ weight64)}

    def step(module):
        def run():
            x.grad = None
            module(x).backward(grad)
        return run

    if repeats:
        row["bf16_s"] = timed(step(linear), repeats, device)
        row["fp8_s"] = timed(step(layer), repeats, device)
        row["speedup"] = row["bf16_s"] / row["fp8_s"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,7,1000,4096", help="token counts (rows of the input)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per layer (0: numbers only)")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = fp8.fp8_unsupported_reason(device)
    if reason is not None:
        print(f"fp8_gemm_check: {reason}", file=sys.stderr)
        return 2
    rows = [check(i, o, int(t), args.repeats, device) for i, o in SHAPES.values() for t in args.tokens.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print("| in x out | tokens | forward error | input-grad error | bf16 ms | fp8 ms | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        timing = (f"{1e3 * r['bf16_s']:.3f} | {1e3 * r['fp8_s']:.3f} | {r['speedup']:.2f}x" if "fp8_s" in r
                  else "| |")
        print(f"| {r['in']} x {r['out']} | {r['tokens']} | {r['forward_error']:.4f} | {r['input_grad_error']:.4f} | "
              f"{timing} |")
    failed = [r for r in rows if not (r["forward_error"] < BOUND and r["input_grad_error"] < BOUND)]
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    if failed:
        print(f"fp8_gemm_check: {len(failed)} case(s) above the error bound {BOUND}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
