"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def learning_curve(log: list[dict[str, Any]], path: str | Path, title: str = "training") -> Path:
    """Training loss and the dev primary metric against steps, from a `fit` log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    devs = [(r["step"], r["dev"][r["dev"]["primary_metric"]]) for r in log if "dev" in r]
    metric = next((r["dev"]["primary_metric"] for r in log if "dev" in r), "metric")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    if losses:
        ax.plot(*zip(*losses, strict=True), color="tab:blue", lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if devs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*devs, strict=True), color="tab:orange", marker="o", label="dev")
        ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
