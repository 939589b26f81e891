"""PNG plots of a run: accuracy per round (global and per site), epsilon per site, the split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MAX_LINES = 12  # per-site lines beyond this would be unreadable


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_accuracy(metrics: dict[str, Any], path: Path) -> None:
    rounds = metrics["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["round"] for r in rounds], [r["global"]["accuracy"] for r in rounds], "k-o", lw=2.5,
            label="global test set")
    per_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for s, m in r.get("sites", {}).items():
            if m.get("accuracy") is not None:
                per_site.setdefault(s, []).append((r["round"], m["accuracy"]))
    for s in sorted(per_site, key=int)[:MAX_LINES]:
        xs, ys = zip(*per_site[s])
        ax.plot(xs, ys, "-", alpha=0.6, lw=1, label=f"site {s} (local test)")
    label = str(metrics.get("metric_label", "accuracy"))
    ax.set(xlabel="round", ylabel=label if len(label) < 30 else "answer accuracy", title=f"{label} per round"[:1].upper()
           + f"{label} per round"[1:], ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    _save(fig, path)


def plot_perplexity(metrics: dict[str, Any], path: Path) -> None:
    """Held-out perplexity per round (generative tasks): the global test set and each site's own."""
    rounds = metrics["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["round"] for r in rounds], [r["global"]["perplexity"] for r in rounds], "k-o", lw=2.5,
            label="global test set")
    per_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for s, m in r.get("sites", {}).items():
            if m.get("eval_loss") is not None:
                per_site.setdefault(s, []).append((r["round"], math.exp(min(float(m["eval_loss"]), 50.0))))
    for s in sorted(per_site, key=int)[:MAX_LINES]:
        xs, ys = zip(*per_site[s])
        ax.plot(xs, ys, "-", alpha=0.6, lw=1, label=f"site {s} (local test)")
    ax.set(xlabel="round", ylabel="perplexity (log scale)", title="Held-out perplexity of the responses per round",
           yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    _save(fig, path)


def plot_epsilon(metrics: dict[str, Any], path: Path, *, target: float | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_site: dict[str, list[tuple[int, float]]] = {}
    for r in metrics["rounds"]:
        for s, m in r.get("sites", {}).items():
            if "epsilon" in m:
                per_site.setdefault(s, []).append((r["round"], m["epsilon"]))
    for s in sorted(per_site, key=int)[:MAX_LINES]:
        xs, ys = zip(*per_site[s])
        ax.plot(xs, ys, "-o", ms=3, label=f"site {s}")
    if target is not None:
        ax.axhline(target, color="r", ls="--", label=f"budget eps={target:g}")
    ax.set(xlabel="round", ylabel="epsilon spent (cumulative)", title="Privacy spent per site", ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_split(counts: np.ndarray, labels: list[str], sites: list[str], path: Path) -> None:
    """Heatmap classes x sites of training examples (the non-IID split)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(sites) + 2), 0.45 * len(labels) + 2.5))
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(len(sites)), sites, rotation=60, ha="right", fontsize=7)
    if counts.size <= 400:
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="w" if v < counts.max() / 2 else "k")
    ax.set_title("Training notes per class and site (non-IID split)")
    fig.colorbar(im, ax=ax, label="notes")
    _save(fig, path)
