"""Weight analyses of a finetune: pairs each base weight with its tuned counterpart and measures the update.

For every selected linear weight `W` (base) and `dW = W_tuned - W_base`, all in float64:

- the spectrum of `W` and of `dW`, with the principal (first r) / minor (last r) split;
- the normalized subspace similarity between the top-r singular vectors of `dW` and the top / bottom /
  random r singular vectors of `W`, on both sides (left = output space, right = input space), as the full
  r x r grid phi(dW, W, i, j) and its corner phi(r, r) (MiLoRA paper, Figure 2);
- the amplification factor ||dW||_F / ||U^T W V||_F against random orthonormal U, V (paper, Table 7).

The math lives in `metrics.py`; this module only selects weights, orients them and collects records.
Weights are oriented `out x in` (GPT-2's `Conv1D` stores `in x out` and is transposed), so "left"
always means the output space.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch

from milora.analysis import metrics

LAYER_INDEX_PATTERN = re.compile(r"\.(\d+)\.")


@dataclass
class WeightPair:
    """One linear weight of the base model and the same weight of the tuned model (`out x in`)."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    layer_type: str  # last component of the module name, e.g. q_proj (see layer_type_of)
    layer_index: int | None  # first integer component of the name, e.g. 0; None for lm_head
    base: torch.Tensor
    tuned: torch.Tensor


def layer_index_of(module_name: str) -> int | None:
    match = LAYER_INDEX_PATTERN.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def layer_type_of(module_name: str) -> str:
    """The last component of the module name (`q_proj`); `vision.q_proj` inside a vision tower (LLaVA), so
    vision and language layers are not averaged together."""
    last = module_name.rsplit(".", 1)[-1]
    return f"vision.{last}" if "vision" in module_name else last


def parse_layer_spec(spec: str | None) -> set[int] | None:
    """`"0,3,10-12"` -> {0, 3, 10, 11, 12}; None or empty -> None (all layers)."""
    if not spec:
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (int(x) for x in part.split("-", 1))
            if last < first:
                raise ValueError(f"empty layer range {part!r}")
            layers.update(range(first, last + 1))
        else:
            layers.add(int(part))
    return layers


def parse_target_spec(spec: str | list[str] | None) -> list[str] | None:
    """`"q_proj,v_proj"` -> ["q_proj", "v_proj"]; None or empty -> None (all linear weights)."""
    if not spec:
        return None
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [p.strip() for p in parts if p.strip()] or None


def matches_target(module_name: str, targets: list[str]) -> bool:
    """A module matches a target when the target is its last name component or a dotted suffix of its name."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def linear_weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Module name -> (weight, stored transposed) for every `nn.Linear` and transformers `Conv1D`."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found[name] = (module.weight, False)
        elif isinstance(module, Conv1D):
            found[name] = (module.weight, True)
    return found


def select_weight_pairs(
    base_model: torch.nn.Module,
    tuned_model: torch.nn.Module,
    targets: list[str] | None = None,
    layers: set[int] | None = None,
) -> tuple[list[WeightPair], dict]:
    """The linear weights to analyse, and notes on what was left out.

    Without `targets`, only weights that differ between the two models are kept (the adapted ones); with
    `targets`, every matching weight is kept, changed or not. `layers` keeps weights whose layer index is in
    the set (weights without an index, such as `lm_head`, are then left out).
    """
    base_weights = linear_weights(base_model)
    tuned_weights = linear_weights(tuned_model)
    pairs, missing, shape_mismatch, unchanged = [], [], [], 0
    for name, (base_weight, transposed) in base_weights.items():
        if targets is not None and not matches_target(name, targets):
            continue
        index = layer_index_of(name)
        if layers is not None and index not in layers:
            continue
        if name not in tuned_weights:
            missing.append(name)
            continue
        tuned_weight = tuned_weights[name][0]
        if tuned_weight.shape != base_weight.shape:
            shape_mismatch.append(name)
            continue
        if targets is None and torch.equal(base_weight, tuned_weight.to(base_weight.device, base_weight.dtype)):
            unchanged += 1
            continue
        base_weight, tuned_weight = base_weight.detach(), tuned_weight.detach()
        if transposed:
            base_weight, tuned_weight = base_weight.T, tuned_weight.T
        pairs.append(WeightPair(name, layer_type_of(name), index, base_weight, tuned_weight))
    notes = {
        "selected": len(pairs),
        "unchanged_skipped": unchanged,
        "missing_in_tuned": missing,
        "shape_mismatch": shape_mismatch,
    }
    return pairs, notes


def _generator(seed: int, name: str, purpose: str) -> torch.Generator:
    # Seeded by the weight's name, so a weight's random baselines do not depend on which others were selected.
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{purpose}".encode()))
    return generator


def analyze_weight_pair(pair: WeightPair, r: int, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """All weight metrics of one pair, as a JSON-ready record plus tensors for plots.

    Returns a dict with the JSON fields and, under the keys `"_grids"` and `"_spectra"`, the similarity grids
    (subset -> side -> r x r float64 tensor) and the spectra of `W` and `dW` (float64 tensors).
    """
    device = torch.device(device)
    if device.type == "mps":
        device = torch.device("cpu")  # no float64 on MPS
    base = metrics.as_float64(pair.base.to(device))
    update = metrics.as_float64(pair.tuned.to(device)) - base
    rank = min(base.shape)
    r_used = min(r, rank)
    U_w, S_w, V_w = metrics.singular_value_decomposition(base)
    update_norm = metrics.frobenius_norm(update)
    record: dict = {
        "name": pair.name,
        "layer_type": pair.layer_type,
        "layer_index": pair.layer_index,
        "shape": list(pair.base.shape),
        "r": r_used,
        "base_frobenius": metrics.frobenius_norm(base),
        "update_frobenius": update_norm,
        "relative_update": update_norm / metrics.frobenius_norm(base) if update_norm else 0.0,
        "base_spectrum": metrics.spectrum_summary(S_w, r_used),
    }
    spectra = {"base": S_w.cpu()}
    if update_norm == 0.0:
        record.update(unchanged=True, update_spectrum=None, similarity=None, amplification=None)
        record["_grids"], record["_spectra"] = None, spectra
        return record
    U_d, S_d, V_d = metrics.singular_value_decomposition(update)
    spectra["update"] = S_d.cpu()
    record["unchanged"] = False
    record["update_spectrum"] = {
        **metrics.spectrum_summary(S_d, r_used),
        # Fraction of ||dW||_F^2 in its own top-r directions: 1 for an update of rank <= r.
        "top_r_energy_fraction": float(S_d[:r_used].pow(2).sum() / S_d.pow(2).sum()),
    }
    update_top = {"left": U_d[:, :r_used], "right": V_d[:, :r_used]}
    weight_vectors = {"left": U_w, "right": V_w}

    grids: dict = {}
    similarity: dict = {}
    positions = {
        subset: metrics.subset_indices(rank, r_used, subset, _generator(seed, pair.name, "similarity"))
        for subset in metrics.SUBSETS
    }
    for subset in metrics.SUBSETS:
        grids[subset], similarity[subset] = {}, {}
        for side in ("left", "right"):
            chosen = weight_vectors[side][:, positions[subset].to(device)]
            grid = metrics.subspace_similarity_grid(update_top[side], chosen)
            grids[subset][side] = grid.cpu()
            similarity[subset][side] = float(grid[-1, -1])
    similarity["random_positions"] = positions["random"].tolist()
    record["similarity"] = similarity

    projection_update = metrics.projection_frobenius_norm(base, update_top["left"], update_top["right"])
    generator = _generator(seed, pair.name, "amplification")
    random_left = metrics.random_orthonormal_basis(base.shape[0], r_used, generator).to(device)
    random_right = metrics.random_orthonormal_basis(base.shape[1], r_used, generator).to(device)
    projection_random = metrics.projection_frobenius_norm(base, random_left, random_right)
    projection_top_of_base = float(S_w[:r_used].pow(2).sum().sqrt())  # ||U_W^T W V_W||_F for W's own top-r
    record["amplification"] = {
        "update_frobenius": update_norm,
        "projection_on_update_directions": projection_update,
        "factor": metrics.amplification_factor(update_norm, projection_update),
        "projection_on_random_directions": projection_random,
        "random_factor": metrics.amplification_factor(update_norm, projection_random),
        "projection_on_top_of_base": projection_top_of_base,
    }
    record["_grids"], record["_spectra"] = grids, spectra
    return record


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize_by_layer_type(records: list[dict]) -> dict:
    """Per layer type: means over its changed weights of phi(r, r), the amplification factors and the grids.

    Grids are averaged only over weights with the same r (the most common one), so shapes agree.
    """
    by_type: dict[str, list[dict]] = {}
    for record in records:
        by_type.setdefault(record["layer_type"], []).append(record)
    summary = {}
    for layer_type, group in by_type.items():
        changed = [rec for rec in group if not rec["unchanged"]]
        entry: dict = {"weights": len(group), "changed": len(changed)}
        if changed:
            entry["similarity"] = {
                subset: {
                    side: _mean([rec["similarity"][subset][side] for rec in changed]) for side in ("left", "right")
                }
                for subset in metrics.SUBSETS
            }
            entry["amplification"] = {
                key: _mean([rec["amplification"][key] for rec in changed])
                for key in ("factor", "random_factor", "update_frobenius")
            }
            entry["relative_update"] = _mean([rec["relative_update"] for rec in changed])
            ranks = [rec["r"] for rec in changed]
            grid_r = max(set(ranks), key=ranks.count)
            same_r = [rec for rec in changed if rec["r"] == grid_r]
            entry["grid_r"] = grid_r
            entry["similarity_grid"] = {
                subset: {
                    side: torch.stack([rec["_grids"][subset][side] for rec in same_r]).mean(0).tolist()
                    for side in ("left", "right")
                }
                for subset in metrics.SUBSETS
            }
        summary[layer_type] = entry
    return summary
