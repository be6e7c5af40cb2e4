"""The report's pictures: one heatmap per metric, the per-case box plots and the model-size chart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from aeval.nifti import atomic_path
from aeval.reporting.cells import MR_DATASETS, display, fmt_value, mean_sd
from aeval.reporting.tables import Grid


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display needed on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(*parts: str | None) -> str:
    """A file-name-safe join of the parts that are set."""
    return "_".join(re.sub(r"[^A-Za-z0-9_]+", "-", p).strip("-") for p in parts if p)


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    return path


def heatmap(grid: Grid, metric: str, path: Path) -> Path:
    """One metric of a grid as a train × test heatmap with the values written in."""
    plt = pyplot()

    matrix = np.array([[c[metric] if (c := grid.cell(k, t)) else np.nan for t in grid.tests] for k in grid.row_keys])
    fig, ax = plt.subplots(figsize=(1.4 * len(grid.tests) + 2.5, 0.7 * len(grid.row_keys) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.tests)), [display(t) for t in grid.tests], rotation=30, ha="right")
    ax.set_yticks(range(len(grid.row_keys)), [grid.label(k) for k in grid.row_keys])
    ax.set_xlabel("test set")
    ax.set_ylabel("training set")
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, "–" if np.isnan(v) else fmt_value(v), ha="center", va="center",
                color="black" if not np.isnan(v) and v > middle else "white", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{metric.upper()} (%)")
    ax.set_title(f"{grid.title} — {metric.upper()}")
    save_figure(fig, path)
    plt.close(fig)
    return path


def case_boxplot(grid: Grid, cells: list[dict], path: Path) -> Path | None:
    """The 2025 README's view: per test set, the distribution of per-case DSC of each training set's model.
    None when no cell of ``grid`` carries per-case values."""
    plt = pyplot()

    per_case = {(c["protocol"], c["train"], c["test"]): c["case_dsc"] for c in cells
                if c.get("case_dsc") and c["organ"] is None and c["metric"] == grid.metric and c["model"] == grid.model}
    tests = [t for t in grid.tests if any(k[2] == t for k in per_case)]
    if not tests:
        return None
    keys = sorted(grid.row_keys, key=lambda k: k[1] in MR_DATASETS) if grid.by_modality else grid.row_keys
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(tests), figsize=(2.2 + 0.45 * len(keys) * len(tests), 4.2), squeeze=False,
                             sharey=True)
    for ax, test in zip(axes[0], tests, strict=True):
        present = [k for k in keys if (*k, test) in per_case]
        boxes = ax.boxplot([per_case[(*k, test)] for k in present], patch_artist=True, widths=0.6,
                           medianprops={"color": "black"})
        for i, (box, key) in enumerate(zip(boxes["boxes"], present, strict=True), start=1):
            box.set_facecolor(colours(keys.index(key) % 10))
            box.set_alpha(0.7)
            values = per_case[(*key, test)]  # the cases themselves: a few cases make no box
            ax.plot(i + np.linspace(-0.15, 0.15, len(values)), values, "o", color="black", markersize=2.5)
        ax.set_xticks(range(1, len(present) + 1), [grid.label(k) for k in present], rotation=60, ha="right",
                      fontsize=8)
        ax.set_title(display(test), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("per-case DSC (%)")
    fig.suptitle(f"{grid.title} — per-case DSC by training set")
    save_figure(fig, path)
    plt.close(fig)
    return path


def model_size_chart(grids: list[Grid], path: Path) -> Path:
    """Figure 3: mean ± SD over the cells per model size, DSC and NSD side by side."""
    plt = pyplot()

    x = np.arange(len(grids))
    fig, ax = plt.subplots(figsize=(1.6 * len(grids) + 2, 4))
    for offset, metric in ((-0.18, "dsc"), (0.18, "nsd")):
        stats = [mean_sd(g.present(metric)) for g in grids]
        bars = ax.bar(x + offset, [s[0] for s in stats], 0.36, yerr=[s[1] for s in stats], capsize=4,
                      label=metric.upper())
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8, label_type="center")
    ax.set_xticks(x, [display(g.model) for g in grids])
    ax.set_ylabel("mean ± SD over cells (%)")
    ax.set_title("Model sizes" + (f" · metric {grids[0].metric}" if grids[0].metric else ""))
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
    return path
