"""The learning curve (loss.png) from metrics.jsonl; image grids live in images.py.

Figures are drawn on a matplotlib `Figure` of their own (its Agg canvas renders the PNG), never through
pyplot, so plotting neither needs a display nor switches the process-wide backend of a caller (a notebook,
a GUI). Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from iclevr_diffusion.io import atomic_path


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_loss(metrics: Path, out: Path, title: str | None = None) -> bool:
    """loss.png: training loss against step (log scale) with lr on a second axis; False if no data yet."""
    rows = [r for r in read_metrics(metrics) if "loss" in r and "step" in r]
    if not rows:
        return False
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (MSE)")
    losses = [r["loss"] for r in rows]
    if min(losses) > 0 and max(losses) / min(losses) > 10:  # log only where it spreads the curve out
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", lw=0.8, alpha=0.7, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title or f"{Path(metrics).parent.name}: training loss")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return True
