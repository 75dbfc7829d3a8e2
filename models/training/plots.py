"""A stage's loss curves as a picture (loss.png), from its log."""

from __future__ import annotations

import json
from pathlib import Path

LOG = "log.jsonl"
PLOT = "loss.png"


def read_log(stage_dir: Path) -> list[dict]:
    path = stage_dir / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(stage_dir: Path, title: str = "") -> Path:
    """Draw log.jsonl's curves to loss.png (Agg canvas: no display, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_log(stage_dir)
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("loss", "train loss"), ("text", "text loss"), ("alignment", "alignment loss"),
                       ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if key == "eval_loss" or len(xs) < 20 else None, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or stage_dir.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out = stage_dir / PLOT
    fig.savefig(out)
    return out
