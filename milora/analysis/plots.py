"""PNG plots of a `milora analyze` report. Drawing only: every number comes from the report dicts.

Uses matplotlib's object API on the Agg canvas (`Figure` + `FigureCanvasAgg`), never pyplot, so it neither
needs a display nor changes the backend of a program that imports it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from milora.analysis.output import save_figure

SUBSET_LABELS = {"top": "top-r of W (principal)", "bottom": "bottom-r of W (minor)", "random": "random r of W"}
SUBSET_COLORS = {"top": "tab:red", "bottom": "tab:blue", "random": "tab:gray"}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _heatmap(axes, grid, title: str):
    grid = np.asarray(grid)
    r_update, r_weight = grid.shape
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto",
                        extent=(0.5, r_weight + 0.5, 0.5, r_update + 0.5))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("j (singular vectors of W)", fontsize=8)
    axes.set_ylabel("i (top of dW)", fontsize=8)
    axes.tick_params(labelsize=7)
    return image


def plot_similarity_heatmaps(by_layer_type: dict, path: str | os.PathLike, side: str = "left") -> Path:
    """phi(dW, W, i, j) grids, one row per layer type, one column per subset of W (paper, Figure 2)."""
    types = [t for t, entry in by_layer_type.items() if entry.get("similarity_grid")]
    figure = _figure(9.0, 2.2 * max(1, len(types)) + 0.4)
    if not types:
        figure.text(0.5, 0.5, "no changed weights", ha="center")
        return save_figure(figure, path)
    grid_axes = figure.subplots(len(types), 3, squeeze=False, sharex=True, sharey=True)
    image = None
    for row, layer_type in enumerate(types):
        entry = by_layer_type[layer_type]
        for col, subset in enumerate(SUBSET_LABELS):
            image = _heatmap(grid_axes[row][col], entry["similarity_grid"][subset][side],
                             f"{layer_type}: dW vs {SUBSET_LABELS[subset]}")
            grid_axes[row][col].label_outer()  # axis labels on the outer panels only (less text, faster)
    figure.colorbar(image, ax=grid_axes, shrink=0.8, label=f"phi(i, j), {side} singular vectors")
    return save_figure(figure, path)


def plot_similarity_by_layer(records: list[dict], path: str | os.PathLike, side: str = "left") -> Path:
    """phi(r, r) against layer index, one panel per layer type, one line per subset of W."""
    changed = [rec for rec in records if not rec["unchanged"] and rec["layer_index"] is not None]
    types = sorted({rec["layer_type"] for rec in changed})
    figure = _figure(4.0 * max(1, min(len(types), 4)), 3.0 * max(1, math.ceil(len(types) / 4)))
    if not types:
        figure.text(0.5, 0.5, "no changed weights with a layer index", ha="center")
        return save_figure(figure, path)
    panels = figure.subplots(math.ceil(len(types) / 4), min(len(types), 4), squeeze=False).ravel()
    for axes, layer_type in zip(panels, types, strict=False):  # the grid may have spare panels
        group = sorted((rec for rec in changed if rec["layer_type"] == layer_type), key=lambda rec: rec["layer_index"])
        x = [rec["layer_index"] for rec in group]
        for subset, label in SUBSET_LABELS.items():
            y = [rec["similarity"][subset][side] for rec in group]
            axes.plot(x, y, marker="o", markersize=3, color=SUBSET_COLORS[subset], label=label)
        axes.set_ylim(-0.02, 1.02)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(layer_type, fontsize=9)
        axes.set_xlabel("layer", fontsize=8)
        axes.set_ylabel("phi(r, r)", fontsize=8)
        axes.tick_params(labelsize=7)
    for axes in panels[len(types):]:
        axes.set_visible(False)
    panels[0].legend(fontsize=7)
    return save_figure(figure, path)


def _spectrum(axes, values, r: int, title: str, color_values=None):
    for index, (label, sigma) in enumerate(values):
        sigma = np.asarray(sigma)
        color = None if color_values is None else color_values[index]
        axes.semilogy(np.arange(1, sigma.size + 1), np.maximum(sigma, 1e-300), lw=1, color=color, label=label)
    if values:
        rank = max(np.asarray(sigma).size for _, sigma in values)
        axes.axvspan(0.5, r + 0.5, color="tab:red", alpha=0.12, lw=0, label="principal (first r)")
        axes.axvspan(rank - r + 0.5, rank + 0.5, color="tab:blue", alpha=0.12, lw=0, label="minor (last r)")
    if values:
        # Few log ticks, no minor ones: tick layout is most of the drawing time of many small log panels.
        axes.yaxis.set_major_locator(LogLocator(numticks=5))
        axes.yaxis.set_minor_locator(NullLocator())
    else:
        axes.text(0.5, 0.5, "unchanged", ha="center", va="center", transform=axes.transAxes, fontsize=8)
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("index", fontsize=8)
    axes.set_ylabel("singular value", fontsize=8)
    axes.tick_params(labelsize=7)


def plot_spectra(records: list[dict], spectra: dict, r: int, path: str | os.PathLike) -> Path:
    """Singular values of W (top row) and of dW (bottom row) per layer type, principal/minor split shaded."""
    types = sorted({rec["layer_type"] for rec in records})
    columns = max(1, min(len(types), 4))
    groups = max(1, math.ceil(len(types) / columns))
    figure = _figure(3.6 * columns, 5.4 * groups)
    if not types:
        figure.text(0.5, 0.5, "no weights selected", ha="center")
        return save_figure(figure, path)
    grid_axes = figure.subplots(2 * groups, columns, squeeze=False)
    for position, layer_type in enumerate(types):
        row, col = 2 * (position // columns), position % columns
        group = [rec for rec in records if rec["layer_type"] == layer_type]
        colors = [_layer_color(i, len(group)) for i in range(len(group))]
        base = [(rec["name"], spectra[rec["name"]]["base"]) for rec in group]
        update = [(rec["name"], spectra[rec["name"]]["update"]) for rec in group if "update" in spectra[rec["name"]]]
        _spectrum(grid_axes[row][col], base, r, f"{layer_type}: W (color: layer)", colors)
        _spectrum(grid_axes[row + 1][col], update, r, f"{layer_type}: dW", colors)
    for position in range(len(types), groups * columns):
        row, col = 2 * (position // columns), position % columns
        grid_axes[row][col].set_visible(False)
        grid_axes[row + 1][col].set_visible(False)
    grid_axes[0][0].legend(handles=grid_axes[0][0].patches[:2], fontsize=7)
    return save_figure(figure, path)


def _layer_color(index: int, count: int):
    from matplotlib import colormaps

    return colormaps["plasma"](0.1 + 0.75 * index / max(1, count - 1))


def _amplification_bars(axes, by_layer_type: dict):
    types = [t for t, entry in by_layer_type.items() if entry.get("amplification")]
    x = np.arange(len(types))
    factor = [by_layer_type[t]["amplification"]["factor"] for t in types]
    random_factor = [by_layer_type[t]["amplification"]["random_factor"] for t in types]
    axes.bar(x - 0.2, _finite(factor), width=0.4, color="tab:purple", label="top-r directions of dW")
    axes.bar(x + 0.2, _finite(random_factor), width=0.4, color="tab:gray", label="random directions")
    axes.set_xticks(x, types, rotation=30, fontsize=7)
    axes.margins(y=0.3)
    axes.set_ylabel("||dW||_F / ||U^T W V||_F", fontsize=8)
    axes.set_title("amplification factor (mean per layer type)", fontsize=9)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7)


def _finite(values):
    return [v if v is not None and math.isfinite(v) else np.nan for v in values]


def plot_amplification(by_layer_type: dict, path: str | os.PathLike) -> Path:
    figure = _figure(6.0, 3.6)
    _amplification_bars(figure.subplots(), by_layer_type)
    return save_figure(figure, path)


def _similarity_bars(axes, by_layer_type: dict, side: str):
    types = [t for t, entry in by_layer_type.items() if entry.get("similarity")]
    x = np.arange(len(types))
    for offset, subset in zip((-0.27, 0.0, 0.27), SUBSET_LABELS, strict=True):
        values = [by_layer_type[t]["similarity"][subset][side] for t in types]
        axes.bar(x + offset, values, width=0.27, color=SUBSET_COLORS[subset], label=SUBSET_LABELS[subset])
    axes.set_xticks(x, types, rotation=30, fontsize=7)
    axes.set_ylim(0, 1.3)
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("phi(r, r)", fontsize=8)
    axes.set_title("top-r of dW vs r singular vectors of W", fontsize=9)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7, loc="upper left", ncols=3)


def _short_name(path: str) -> str:
    """The last path component (hub ids keep their org/name form)."""
    if Path(path).exists():
        return Path(path).name or str(path)
    return str(path)


def plot_summary(report: dict, records: list[dict], spectra: dict, path: str | os.PathLike,
                 side: str = "left") -> Path:
    """One overview figure: mean similarity grids over all changed weights (top row); phi(r, r) per layer
    type, amplification per layer type and the spectra of the most-updated weight (bottom row)."""
    changed = [rec for rec in records if not rec["unchanged"]]
    figure = _figure(12.0, 7.0)
    tuned = _short_name(report["tuned"]["model"])
    if report["tuned"]["adapter"]:
        tuned += f" + {_short_name(report['tuned']['adapter'])}"
    title = f"milora analyze: {tuned} vs {_short_name(report['base']['model'])}, r = {report['r']}"
    forgetting = report.get("forgetting") or {}
    if forgetting.get("forgetting_loss") is not None:
        title += f"; forgetting loss (KL) = {forgetting['forgetting_loss']:.4g}"
    figure.suptitle(title, fontsize=10)
    if not changed:
        figure.text(0.5, 0.5, "no changed weights", ha="center")
        return save_figure(figure, path)
    top_row, bottom_row = figure.subfigures(2, 1)
    heat_axes = top_row.subplots(1, 3)
    ranks = [rec["r"] for rec in changed]
    grid_r = max(set(ranks), key=ranks.count)
    same_r = [rec for rec in changed if rec["r"] == grid_r]
    image = None
    for axes, subset in zip(heat_axes, SUBSET_LABELS, strict=True):
        mean_grid = np.mean([np.asarray(rec["_grids"][subset][side]) for rec in same_r], axis=0)
        image = _heatmap(axes, mean_grid, f"dW vs {SUBSET_LABELS[subset]} (mean of {len(same_r)})")
    top_row.colorbar(image, ax=heat_axes, shrink=0.9, label=f"phi(i, j), {side} vectors")
    sim_axes, amp_axes, spec_axes = bottom_row.subplots(1, 3)
    by_layer_type = report["by_layer_type"]
    _similarity_bars(sim_axes, by_layer_type, side)
    _amplification_bars(amp_axes, by_layer_type)
    largest = max(changed, key=lambda rec: rec["relative_update"])
    entry = spectra[largest["name"]]
    _spectrum(spec_axes, [("W", entry["base"]), ("dW", entry["update"])], largest["r"],
              f"spectra of {largest['name']}", ["black", "tab:orange"])
    spec_axes.legend(fontsize=7)
    return save_figure(figure, path)
