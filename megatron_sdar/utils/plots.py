"""Training curves from ``metrics.jsonl`` files (matplotlib, Agg backend: no display needed).

    plot_training("runs/sdar/metrics.jsonl", "runs/sdar/training.png")
    plot_comparison({"grpo": "runs/grpo/metrics.jsonl", "sdar": "runs/sdar/metrics.jsonl"}, "cmp.png")
    plot_bands({"grpo": {"0": [(0, 0.3), (10, 0.5)], "1": [...]}, ...}, "bands.png")   # over seeds

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
    ("success rate", ("eval/success_rate", "eval/greedy/success_rate", "eval/with_skills/success_rate",
                      "rollout/success_rate"), "success rate"),
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
    """Draw ``(label, rows, key)`` curves that have data; say "not logged" when none has. A key
    logged with ``<key>_ci_low`` / ``<key>_ci_high`` gets its confidence band shaded."""
    drawn = 0
    for label, rows, key in curves:
        steps, values = _series(rows, key)
        if not steps or all(math.isnan(v) for v in values):
            continue
        # Sparse metrics (evaluation every N steps) would be near invisible as a bare line.
        line, = ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
        low_steps, low = _series(rows, key + "_ci_low")
        high_steps, high = _series(rows, key + "_ci_high")
        if low_steps and low_steps == high_steps:
            ax.fill_between(low_steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
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


def plot_bands(runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], out_png: str | Path,
               title: str = "", ylabel: str = "held-out success") -> Path:
    """One curve per name: the mean over its runs (seeds) at each step, with the 95% t-interval
    over those runs shaded. ``runs[name][seed] = [(step, value), ...]``. Returns ``out_png``."""
    from megatron_sdar.utils.stats import mean_ci

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for name, seeds in runs.items():
            by_step: dict[int, list[float]] = {}
            for points in seeds.values():
                for step, value in points:
                    by_step.setdefault(step, []).append(value)
            steps = sorted(by_step)
            stats = [mean_ci(by_step[s]) for s in steps]
            means = [m for m, _ in stats]
            halves = [0.0 if h != h else h for _, h in stats]
            line, = ax.plot(steps, means, marker="o", markersize=3, label=f"{name} (n={len(seeds)})")
            ax.fill_between(steps, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        return _finish(fig, ax, out_png, "step", ylabel, title)
    finally:
        plt.close(fig)


def _finish(fig, ax, out_png: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid and legend of a one-panel figure, saved to ``out_png``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out_png)


def plot_regime(points: Sequence[Mapping], out_png: str | Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    """One point per level (``label``, ``x``, ``x_half``, ``y``, ``y_half``): the mean with its 95%
    intervals as error bars on both axes, and the line y = 0. Returns ``out_png``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax.axhline(0.0, color="grey", linewidth=1, linestyle="--")
        for point in points:
            ax.errorbar([point["x"]], [point["y"]], xerr=[[point["x_half"]], [point["x_half"]]],
                        yerr=[[point["y_half"]], [point["y_half"]]], marker="o", capsize=4, label=point["label"])
        return _finish(fig, ax, out_png, xlabel, ylabel, title)
    finally:
        plt.close(fig)
