"""`analyze()`: runs every analysis of a base / finetuned pair and writes the report directory.

Output directory (each file written atomically; `report.json` last, so its presence means a full run):

- ``report.json``   sources, r, per-weight records, per-layer-type summaries, forgetting metrics, file list;
- ``spectra.json``  full singular values of W and dW per analysed weight (kept out of report.json: large);
- ``summary.png``, ``similarity_heatmaps.png``, ``similarity_by_layer.png``, ``spectra.png``,
  ``amplification.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from milora.analysis import forgetting as forgetting_module
from milora.analysis import loading, plots, weights
from milora.analysis.output import write_report_json

REPORT_VERSION = 1
PLOT_NAMES = ("summary", "similarity_heatmaps", "similarity_by_layer", "spectra", "amplification")
NO_FORGETTING = ("", "none", "skip")


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _prepare_forgetting_blocks(spec, base_source, tuned_source, seq_len, max_samples, explicit: bool):
    """(tokenizer, blocks, None) or (None, None, reason skipped). Raises only for data the user named."""
    try:
        tokenizer = loading.load_tokenizer(base_source.model, tuned_source.model, tuned_source.adapter)
        blocks = forgetting_module.token_blocks(forgetting_module.iter_texts(spec), tokenizer, seq_len, max_samples)
        if not blocks:
            raise ValueError(f"forgetting data {spec!r} has no text")
        return tokenizer, blocks, None
    except Exception as exc:  # noqa: BLE001 - the default corpus is optional (offline machines)
        if explicit:
            message = f"cannot use forgetting data {spec!r}: {type(exc).__name__}: {exc}"
            raise loading.AnalysisInputError(message) from exc
        reason = f"default forgetting data {spec!r} unavailable ({type(exc).__name__}: {exc}); " \
                 "pass --forgetting_data FILE to measure forgetting"
        print(f"milora analyze: warning: {reason}", file=sys.stderr)
        return None, None, reason


def analyze(
    base: str,
    tuned: str | None,
    out_dir: str | Path,
    adapter: str | None = None,
    r: int | None = None,
    targets: str | list[str] | None = None,
    layers: str | None = None,
    forgetting_data: str | None = forgetting_module.DEFAULT_FORGETTING_DATA,
    max_samples: int | None = 64,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str | None = "auto",
    dtype: str = "float32",
    seed: int = 0,
    show_progress: bool = True,
    plot_names: tuple[str, ...] | None = None,
) -> dict:
    """Analyse `tuned` (and/or `adapter`) against `base` (see `loading` for what each argument may be), write
    the output directory (module docstring) and return the report dict.

    `plot_names`: which of PLOT_NAMES to draw (default: all); drawing is most of the time for a small model.
    """
    from tqdm.auto import tqdm

    started = time.time()
    out_dir = Path(out_dir)
    device = resolve_device(device)
    base_source, tuned_source = loading.resolve_sources(base, tuned, adapter)
    warnings = loading.source_warnings(tuned_source)
    for warning in warnings:
        print(f"milora analyze: warning: {warning}", file=sys.stderr)
    if r is None:
        r, r_source = loading.default_rank(base_source, tuned_source)
    else:
        r_source = "--r"
    if r < 1:
        raise loading.AnalysisInputError(f"r must be at least 1, got {r}")
    unknown_plots = set(plot_names or ()) - set(PLOT_NAMES)
    if unknown_plots:
        raise loading.AnalysisInputError(f"unknown plots {sorted(unknown_plots)}; choose from {', '.join(PLOT_NAMES)}")
    target_list = weights.parse_target_spec(targets)
    try:
        layer_set = weights.parse_layer_spec(layers)
    except ValueError as exc:
        raise loading.AnalysisInputError(f"--layers {layers!r}: {exc}") from exc

    forgetting_spec = None if forgetting_data is None or forgetting_data.lower() in NO_FORGETTING else forgetting_data
    blocks = tokenizer = None
    forgetting_skipped = "no --forgetting_data" if forgetting_spec is None else None
    if forgetting_spec is not None:
        explicit = forgetting_spec != forgetting_module.DEFAULT_FORGETTING_DATA
        tokenizer, blocks, forgetting_skipped = _prepare_forgetting_blocks(
            forgetting_spec, base_source, tuned_source, seq_len, max_samples, explicit)

    base_model = loading.load_source(base_source, dtype)
    tuned_model = loading.load_source(tuned_source, dtype)

    pairs, selection = weights.select_weight_pairs(base_model, tuned_model, target_list, layer_set)
    records, spectra = [], {}
    for pair in tqdm(pairs, desc="weights", disable=not show_progress):
        record = weights.analyze_weight_pair(pair, r, seed=seed, device=device)
        records.append(record)
        spectra[pair.name] = record["_spectra"]
    by_layer_type = weights.summarize_by_layer_type(records)

    forgetting = None
    if blocks is not None:
        base_model.to(device)
        tuned_model.to(device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        forgetting = forgetting_module.forgetting_loss(
            base_model, tuned_model, blocks, batch_size=batch_size, device=device, pad_id=pad_id,
            show_progress=show_progress)
        forgetting.update(data=forgetting_spec, seq_len=seq_len, max_samples=max_samples)
    elif forgetting_skipped is not None:
        forgetting = {"skipped": forgetting_skipped}

    report = {
        "report_version": REPORT_VERSION,
        "base": base_source.describe(),
        "tuned": tuned_source.describe(),
        "r": r,
        "r_source": r_source,
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "selection": {"targets": target_list, "layers": sorted(layer_set) if layer_set else None, **selection},
        "definitions": {
            "update": "dW = W_tuned - W_base (float64), weights oriented out x in",
            "similarity": "phi(A, B, i, j) = ||A_i^T B_j||_F^2 / min(i, j), A = top singular vectors of dW, "
                          "B = top / bottom (smallest first) / random singular vectors of W; reported at i = j = r; "
                          "left = output space, right = input space",
            "amplification": "factor = ||dW||_F / ||U^T W V||_F, U, V = top-r singular vectors of dW; "
                             "random_factor uses random orthonormal U, V",
            "forgetting": forgetting_module.DEFINITION,
        },
        "by_layer_type": by_layer_type,
        "weights": [{k: v for k, v in rec.items() if not k.startswith("_")} for rec in records],
        "forgetting": forgetting,
        "warnings": warnings,
    }

    files = {"spectra": "spectra.json"}
    write_report_json(out_dir / "spectra.json", {
        name: {kind: values.tolist() for kind, values in entry.items()} for name, entry in spectra.items()})
    plot_files = {
        "summary": ("summary.png", lambda p: plots.plot_summary(report, records, spectra, p)),
        "similarity_heatmaps": ("similarity_heatmaps.png", lambda p: plots.plot_similarity_heatmaps(by_layer_type, p)),
        "similarity_by_layer": ("similarity_by_layer.png", lambda p: plots.plot_similarity_by_layer(records, p)),
        "spectra": ("spectra.png", lambda p: plots.plot_spectra(records, spectra, r, p)),
        "amplification": ("amplification.png", lambda p: plots.plot_amplification(by_layer_type, p)),
    }
    for key, (filename, draw) in plot_files.items():
        if plot_names is not None and key not in plot_names:
            continue
        draw(out_dir / filename)
        files[key] = filename
    report["files"] = files
    report["seconds"] = round(time.time() - started, 3)
    write_report_json(out_dir / "report.json", report)
    return report
