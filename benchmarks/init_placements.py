"""MiLoRA init at LLaMA-2-70B shapes on one GPU, for both placements of the weights (`init_speed.py --preset 70b`).

A 70B model does not fit on one GPU in bf16, so `milora init` keeps it in CPU memory and streams each matrix to
the GPU and back (`milora.streaming`). This times `apply_milora` end to end on `--layers` decoder layers of
LLaMA-2-70B's shapes (hidden 8192, MLP 28672, 8 KV heads; q,k,v,up,down: 5 matrices a layer, r = 64), random bf16
weights, and projects to the model's 80 layers (`--layers 80` times all 400 matrices: the untargeted weights of
the layers are shared, so the targets' 88 GB fit in GPU or host memory):

- `cpu`: the model in CPU memory, `device="cuda"`: bytes copied each way, the copies' own throughput (device
  time of the copies) and bytes / wall time, GPU peak memory;
- `gpu`: the same layers built on the GPU (the decomposition and the residual in place).

Each row also gives the seconds spent decomposing (`initialize_layers`), apart from wrapping the model in LoRA
layers. Then it checks a few matrices of the first layer against a float64 reference (float64 `eigh` of the Gram
matrix on the GPU): the subspace overlap of the factors with the reference minor singular vectors, the relative
error of `s B A` against the reference `U_r S_r V_r^T`, and that residual + `s B A` gives back the weight. Last
(unless `--no_profile`), a per-phase profile of one decomposition per shape (Gram GEMM, subspace iteration,
residual, and the whole decomposition with the solver `apply_milora` picks), the kernels of one up_proj
decomposition, and with `--busy` how busy the GPU is during a run (wall time against the union of its kernels).
"""

from __future__ import annotations

import contextlib
import time

import torch

from milora import apply_milora
from milora.decomposition import (
    _minor_components_by_subspace_iteration,
    singular_components,
    smaller_gram,
    subspace_overlap,
    subtract_low_rank_,
)
from milora.distributed import lora_layers
from milora.streaming import TransferStats

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-5)
# the embeddings are no target: a small vocabulary keeps the model quick to build
SMOKE = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=80, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
CHECKED = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(shapes: dict, layers: int, device: str, gpu: str):
    """A LlamaForCausalLM of `shapes` with `layers` layers whose targeted weights are random bf16 values, drawn on
    `gpu` (drawing billions of values on the CPU takes minutes) and then moved to `device`: the same weights for
    either placement. The decoder layers' other weights (o_proj, gate_proj, the norms) are no target: all layers
    share one tensor of each, so that the 80 layers' targets (88 GB) fit in memory without the rest of the model
    (another 50 GB)."""
    from init_speed import rebuild_rotary_embedding
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shapes, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device=gpu).manual_seed(0)
    shared = {}

    def drawn(shape):
        values = torch.empty(shape, dtype=torch.bfloat16, device=gpu).normal_(0, 0.02, generator=generator)
        return values.to(device)

    for name, module in model.named_modules():
        for key, parameter in list(module.named_parameters(recurse=False)):
            targeted = name.rsplit(".", 1)[-1] in TARGETS
            if targeted or ".layers." not in name:
                values = drawn(parameter.shape)
            else:
                if (key, parameter.shape) not in shared:
                    shared[key, parameter.shape] = drawn(parameter.shape)
                values = shared[key, parameter.shape]
            setattr(module, key, torch.nn.Parameter(values, requires_grad=parameter.requires_grad))
    rebuild_rotary_embedding(model, config, device)
    return model


def checked_weights(model) -> dict[str, torch.Tensor]:
    layer = model.model.layers[0]
    return {name: layer.get_submodule(name).weight.detach().clone() for name in CHECKED}


@contextlib.contextmanager
def timed_decompositions(device):
    """The seconds `apply_milora` spends in `initialize_layers` (decompositions, residuals, copies), apart from
    wrapping the model in PEFT's LoRA layers and checking it, in the yielded dict."""
    import milora.model

    original = milora.model.initialize_layers
    timing = {"seconds": 0.0}

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync(device)
            timing["seconds"] += time.perf_counter() - start

    milora.model.initialize_layers = timed
    try:
        yield timing
    finally:
        milora.model.initialize_layers = original


def run_placement(shapes, layers, r, placement, gpu, references, workers=None):
    """`apply_milora` on `layers` layers with the weights on `placement` (cpu/gpu), decomposing on `gpu` with
    `workers` decompositions in flight (default: the library's)."""
    model = build(shapes, layers, gpu if placement == "gpu" else "cpu", gpu)
    originals = checked_weights(model)
    stats = TransferStats()
    on_gpu = torch.device(gpu).type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    sync(gpu)
    start = time.perf_counter()
    with timed_decompositions(gpu) as decomposing:
        peft_model = apply_milora(model, TARGETS, r, method="milora", device=gpu, transfer_stats=stats,
                                  show_progress=False, workers=workers)
    sync(gpu)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else 0
    layers_found = {name.removeprefix("base_model.model.model.layers.0."): layer
                    for name, layer in lora_layers(peft_model) if ".layers.0." in name}
    checks = [check_factors(name, originals[name], layers_found[name], r, references) for name in CHECKED]
    row = {
        "placement": placement, "layers": layers, "matrices": len(lora_layers(peft_model)), "seconds": seconds,
        "bytes_to_gpu": stats.bytes_to_device, "bytes_to_host": stats.bytes_to_host,
        "copy_seconds": stats.copy_seconds, "gpu_peak_bytes": peak, "decomposing_seconds": decomposing["seconds"],
        "gpu_peak_over_resident_bytes": peak - resident if on_gpu else 0, "checks": checks,
    }
    del peft_model, model
    return row


@torch.no_grad()
def check_factors(name, weight, layer, r, references):
    """The layer's factors and residual against a float64 reference computed from the original weight (computed
    once per weight: both placements draw the same weights)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.to(device)
    known = references.get(name)
    if known is None or not torch.equal(known[0], weight.cpu()):
        known = references[name] = (weight.cpu(), singular_components(w, r, "minor", solver="gram"))  # float64 eigh
    reference = known[1]
    scaling = layer.scaling["default"]
    B = layer.lora_B["default"].weight.to(device, torch.float64)
    A = layer.lora_A["default"].weight.to(device, torch.float64)
    product = scaling * B @ A
    residual = layer.get_base_layer().weight.to(device, torch.float64)
    w64 = w.to(torch.float64)
    return {
        "matrix": name, "shape": list(weight.shape),
        "overlap_U": subspace_overlap(B, reference.U), "overlap_V": subspace_overlap(A.T, reference.Vh.T),
        "product_rel_err": float((product - reference.product()).norm() / reference.product().norm()),
        # the residual is W - s B A rounded once to bf16: its error is bf16 rounding of the residual
        "reconstruction_rel_err": float((residual + product - w64).norm() / w64.norm()),
    }


def phase_profile(shapes, r, device):
    """Seconds of each phase of one decomposition (synchronised), per distinct shape."""
    h, m, kv = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_key_value_heads"]
    head = h // shapes["num_attention_heads"]
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for name, (out_f, in_f) in {"q_proj": (h, h), "k/v_proj": (kv * head, h), "up_proj": (m, h),
                                "down_proj": (h, m)}.items():
        weight = (torch.randn(out_f, in_f, generator=generator, device=device) * 0.02).to(torch.bfloat16)
        singular_components(weight[:256, :256], 8, "minor")  # libraries warm
        times = {}
        sync(device)
        start = time.perf_counter()
        gram, wide = smaller_gram(weight)
        sync(device)
        times["gram_s"] = time.perf_counter() - start
        start = time.perf_counter()
        found = _minor_components_by_subspace_iteration(weight, gram, wide, r)
        sync(device)
        times["subspace_s"] = time.perf_counter() - start
        start = time.perf_counter()
        fell_back = found is None
        if fell_back:
            found = singular_components(weight, r, "minor", solver="gram")
            sync(device)
        times["fallback_eigh_s"] = time.perf_counter() - start if fell_back else 0.0
        start = time.perf_counter()
        subtract_low_rank_(weight, found.U * found.S, found.Vh)
        sync(device)
        times["residual_s"] = time.perf_counter() - start
        start = time.perf_counter()
        singular_components(weight, r, "minor")  # what `apply_milora` runs (`auto`: `eigh` for k/v at r = 64)
        sync(device)
        times["auto_s"] = time.perf_counter() - start
        gram_tflop = 2 * min(out_f, in_f) ** 2 * max(out_f, in_f) / 1e12
        rows.append({"shape": name, "out": out_f, "in": in_f, **times, "gram_tflop": gram_tflop,
                     "gram_tflops_per_s": gram_tflop / times["gram_s"]})
    return rows


def kernel_profile(shapes, r, device) -> str:
    """torch.profiler's table of the kernels of one up_proj decomposition (the largest shape), top 15."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator(device=device).manual_seed(1)
    weight = (torch.randn(shapes["intermediate_size"], shapes["hidden_size"], generator=generator, device=device)
              * 0.02).to(torch.bfloat16)
    singular_components(weight, r, "minor")
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        singular_components(weight, r, "minor")
        sync(device)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return "\nkernels of one up_proj decomposition:\n" + prof.key_averages().table(sort_by=key, row_limit=15)
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def busy_profile(shapes, layers, r, gpu, workers=None) -> dict:
    """How busy the GPU is during `apply_milora` with the weights on it: the wall time, the sum of its kernels'
    (and copies') times, and the time during which at least one ran (their union; kernels of several streams
    overlap). Busy well below the wall time means host waits; a sum well above it, overlap."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = build(shapes, layers, gpu, gpu)
    sync(gpu)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        peft_model = apply_milora(model, TARGETS, r, method="milora", show_progress=False, workers=workers)
        sync(gpu)
        wall = time.perf_counter() - start
    del peft_model, model
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    total = sum(end - begin for begin, end in spans) / 1e6
    busy, reach = 0.0, None
    for begin, end in spans:
        if reach is None or begin > reach:
            busy += end - begin
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    return {"layers": layers, "wall_s": wall, "kernel_sum_s": total, "busy_s": busy / 1e6, "kernels": len(spans)}


def print_report(rows, profile, device_name, r, layers, total_layers):
    scale = total_layers / layers
    print(f"\nLLaMA-2-70B shapes, {layers} layers timed, projected to {total_layers}; r={r}, bf16, "
          f"device: {device_name}")
    print(f"{'weights in':<11}{'matrices':>9}{'seconds':>9}{'decomp. s':>10}{'proj. s':>9}{'GB to GPU':>11}"
          f"{'GB back':>9}{'copy GB/s':>11}{'GB/s wall':>11}{'GPU peak GiB':>14}{'over model GiB':>16}")
    for row in rows:
        moved = row["bytes_to_gpu"] + row["bytes_to_host"]
        copy_rate = moved / row["copy_seconds"] / 1e9 if row["copy_seconds"] else 0.0
        print(f"{row['placement'] + ' memory':<11}{row['matrices']:>9}{row['seconds']:>9.2f}"
              f"{row['decomposing_seconds']:>10.2f}"
              f"{row['seconds'] * scale:>9.1f}{row['bytes_to_gpu'] / 1e9:>11.2f}{row['bytes_to_host'] / 1e9:>9.2f}"
              f"{copy_rate:>11.1f}"
              f"{moved / row['seconds'] / 1e9:>11.1f}{row['gpu_peak_bytes'] / 2**30:>14.2f}"
              f"{row['gpu_peak_over_resident_bytes'] / 2**30:>16.2f}")
    print("\nfactors against float64 eigh of the Gram matrix (layer 0):")
    print(f"{'weights in':<11}{'matrix':<18}{'overlap U':>12}{'overlap V':>12}{'sBA rel err':>13}{'W rel err':>11}")
    for row in rows:
        for check in row["checks"]:
            print(f"{row['placement'] + ' memory':<11}{check['matrix']:<18}{1 - check['overlap_U']:>12.1e}"
                  f"{1 - check['overlap_V']:>12.1e}{check['product_rel_err']:>13.1e}"
                  f"{check['reconstruction_rel_err']:>11.1e}")
    print("(1 - overlap of the factors' column/row spaces; s B A from the float32 LoRA weights; W: residual + s B A)")
    print(f"\none decomposition per shape, phases (s): {'gram':>8}{'subspace':>10}{'eigh fb':>9}{'residual':>10}"
          f"{'Gram TFLOP/s':>14}{'auto':>8}")
    for row in profile:
        print(f"  {row['shape']:<10}{row['out']:>6}x{row['in']:<6}{'':>14}{row['gram_s']:>8.4f}"
              f"{row['subspace_s']:>10.4f}{row['fallback_eigh_s']:>9.4f}{row['residual_s']:>10.4f}"
              f"{row['gram_tflops_per_s']:>14.1f}{row['auto_s']:>8.4f}")
    print("(auto: the whole decomposition as apply_milora runs it, with its solver choice, Gram included)")


def run(args):
    """`init_speed.py --preset 70b`: both placements, checks, profile; returns the JSON record."""
    smoke = args.device == "cpu"
    shapes = SMOKE if smoke else LLAMA2_70B
    gpu = args.device
    device_name = torch.cuda.get_device_name() if torch.device(gpu).type == "cuda" else "cpu"
    references = {}
    # warm-up (CUDA context, cuBLAS/cuSOLVER handles); layer 0 is drawn first, so its references carry over
    run_placement(shapes, 1, args.r, "cpu", gpu, references)
    placements = ["cpu"] if smoke else getattr(args, "placements", "cpu,gpu").split(",")
    rows = [run_placement(shapes, args.layers, args.r, placement, gpu, references, getattr(args, "workers", None))
            for placement in placements]
    profiled = not getattr(args, "no_profile", False)
    profile = phase_profile(shapes, args.r, gpu) if profiled else []
    print_report(rows, profile, device_name, args.r, args.layers, shapes["num_hidden_layers"])
    on_cuda = torch.device(gpu).type == "cuda"
    kernels = kernel_profile(shapes, args.r, gpu) if on_cuda and profiled else ""
    print(kernels)
    busy = None
    if getattr(args, "busy", False) and on_cuda:
        try:
            busy = busy_profile(shapes, min(args.layers, 4), args.r, gpu, getattr(args, "workers", None))
        except Exception as error:  # a diagnostic: the measurements above stand without it
            print(f"\nGPU activity profile failed: {error!r}")
    if busy is not None:
        print(f"\nGPU activity, weights in GPU memory, {busy['layers']} layers under the profiler: wall "
              f"{busy['wall_s']:.2f} s, kernels and copies {busy['kernel_sum_s']:.2f} s summed over "
              f"{busy['kernels']} of them, at least one running {busy['busy_s']:.2f} s "
              f"({busy['busy_s'] / busy['wall_s']:.0%} of the wall time)")
    return {"device": device_name, "shapes": shapes, "r": args.r, "rows": rows, "profile": profile,
            "projected_layers": shapes["num_hidden_layers"], "kernel_profile": kernels, "busy": busy}
