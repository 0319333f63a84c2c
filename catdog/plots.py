"""Figures: matplotlib without a display, PNGs written atomically, and the val_loss curves every training step
draws (the report's TensorBoard charts).

Used by: 01 (image sizes), 03-06 (curves), 07 (worst images, suspects), cam.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import log
from .files import atomic_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> None:
    """Save a PNG atomically and close the figure."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    log.info(f"wrote {path}")


def plot_curves(histories: dict[str, pd.DataFrame], path: str | Path, metric: str = "val_loss",
                title: str = "", baseline: str | None = None, marks: dict[str, int] | None = None) -> None:
    """One line per run of `metric` by epoch (the report's TensorBoard charts), `baseline` blue and thick, a star
    on each run's saved epoch (`marks`), a dotted line where a `phase` column changes (04's warmup -> block)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in histories.items():
        style = {"color": "tab:blue", "linewidth": 3} if name == baseline else {}
        (line,) = ax.plot(h.epoch, h[metric], marker="o", markersize=3, label=name, **style)
        saved = (marks or {}).get(name)
        if saved is not None and saved in set(h.epoch):
            ax.plot([saved], h.loc[h.epoch == saved, metric], "*", markersize=14, color=line.get_color())
        if "phase" in h and h.phase.nunique() > 1:
            switch = int(h.epoch[(h.phase != h.phase.shift()).to_numpy()].iloc[1])
            phase = h.phase[h.epoch == switch].iloc[0]
            ax.axvline(switch - 0.5, linestyle=":", color=line.get_color(),
                       label=f"{name}: {phase} from epoch {switch}")
    ax.set(xlabel="epoch", ylabel=metric, title=title + ("  (*: saved epoch)" if marks else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # K-fold rows have no single curve
        ax.legend()
    save_figure(fig, path)
