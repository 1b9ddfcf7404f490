"""Training curves from ``metrics.jsonl`` files (matplotlib, Agg backend: no display needed).

    plot_training("runs/sdar/metrics.jsonl", "runs/sdar/training.png")
    plot_comparison({"grpo": "runs/grpo/metrics.jsonl", "sdar": "runs/sdar/metrics.jsonl"}, "cmp.png")

Metrics absent from a run are skipped (a panel with nothing to show says so) so the same call
works for every preset: ``grpo`` logs no gate statistics, a run without evaluation has no
``eval/success_rate``. NaN values (logged as ``"nan"``) leave gaps in the curves.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from megatron_sdar.utils.logging import read_metrics

# (panel title, metric keys drawn in it, y-axis label)
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("success rate", ("eval/success_rate", "rollout/success_rate"), "success rate"),
    ("reward", ("rollout/reward_mean",), "mean episode reward"),
    ("gate statistics", ("sdar/gate_mean", "sdar/gate_active_ratio", "sdar/gap_mean"), "value"),
)
COMPARISON_KEYS = ("eval/success_rate", "rollout/success_rate", "rollout/reward_mean")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless clusters and CI: never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows that hold a numeric ``key`` (NaN kept: it draws a gap)."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in row:
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _panel(ax, curves: Iterable[tuple[str, list[Mapping], str]], title: str, ylabel: str) -> None:
    """Draw ``(label, rows, key)`` curves that have data; say "not logged" when none has."""
    drawn = 0
    for label, rows, key in curves:
        steps, values = _series(rows, key)
        if not steps or all(math.isnan(v) for v in values):
            continue
        # Sparse metrics (evaluation every N steps) would be near invisible as a bare line.
        ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png


def plot_training(metrics_jsonl: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """One PNG with a panel per entry of :data:`TRAINING_PANELS` (success rates, reward, gate
    statistics) against the step; returns ``out_png``."""
    plt = _pyplot()
    rows = read_metrics(metrics_jsonl)
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(5 * len(TRAINING_PANELS), 4), squeeze=False)
    try:
        for ax, (panel_title, keys, ylabel) in zip(axes[0], TRAINING_PANELS):
            _panel(ax, [(key, rows, key) for key in keys], panel_title, ylabel)
        fig.suptitle(title or str(Path(metrics_jsonl)))
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def plot_comparison(runs: Mapping[str, str | Path], out_png: str | Path,
                    keys: Sequence[str] = COMPARISON_KEYS) -> Path:
    """One figure with a panel per metric in ``keys`` and one curve per run in each (e.g. GRPO vs
    SDAR); runs that did not log a metric are left out of its panel. Returns ``out_png``."""
    if not runs or not keys:
        raise ValueError(f"plot_comparison needs at least one run and one key, got runs={list(runs)} keys={list(keys)}")
    plt = _pyplot()
    data = {name: read_metrics(path) for name, path in runs.items()}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    try:
        for ax, key in zip(axes[0], keys):
            _panel(ax, [(name, rows, key) for name, rows in data.items()], key, key.rsplit("/", 1)[-1])
        return _save(fig, out_png)
    finally:
        plt.close(fig)
