"""The sweep's own charts, drawn from its MLflow runs: a parent run's ``plots/`` artifacts.

- ``metric_vs_<param>.png``: each dataset's ranking metric against one searched parameter
  (one panel per dataset, one point per finished trial, the per-value mean as a line).
- ``learning_curves.png``: each dataset's ranking metric over training (global iteration),
  the dataset's best :data:`CURVES_PER_DATASET` trials on the same panel (a thousand curves
  in one panel show nothing, and each is one metric-history read).

Each function returns the matplotlib ``Figure`` so a caller (or a test) can read back the data
it was drawn from; :func:`save` writes it as a PNG of a fixed size.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from orchestration.results.compare import DatasetSummary, natural_order

CURVES_PER_DATASET = 10
"""Learning curves drawn per dataset: its best trials by their final ranking metric."""
PANEL_INCHES = (4.0, 3.0)
DPI = 100


def _panels(count: int) -> tuple[Figure, list[Any]]:
    fig, axes = plt.subplots(
        1, count, figsize=(PANEL_INCHES[0] * count, PANEL_INCHES[1]), dpi=DPI, squeeze=False
    )
    return fig, list(axes[0])


def metric_vs_parameter(summaries: list[DatasetSummary], param: str) -> Figure:
    """One panel per dataset: the ranking metric of each trial against ``param``.

    Numeric values go on a numeric axis; others (a schedule name) are placed in sorted order.
    """
    fig, axes = _panels(len(summaries))
    for ax, summary in zip(axes, summaries):
        points = [(t.params[param], t.metrics[summary.metric]) for t in summary.scored
                  if param in t.params]  # fmt: skip
        values = sorted({v for v, _ in points}, key=natural_order)
        numeric = all(natural_order(v)[0] == 0 for v in values)
        position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
        ax.scatter([position[v] for v, _ in points], [m for _, m in points], label="trials")
        means = [statistics.fmean(m for v2, m in points if v2 == v) for v in values]
        ax.plot([position[v] for v in values], means, marker="_", label="mean")
        if not numeric:
            ax.set_xticks(range(len(values)), values)
        ax.set_title(summary.dataset)
        ax.set_xlabel(param)
        ax.set_ylabel(summary.metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def learning_curves(client: Any, summaries: list[DatasetSummary]) -> Figure:
    """One panel per dataset: the ranking metric at each evaluation of the dataset's best
    :data:`CURVES_PER_DATASET` trials (all of them in a smaller sweep)."""
    fig, axes = _panels(len(summaries))
    for ax, summary in zip(axes, summaries):
        ranked = sorted(summary.scored, key=lambda t: -t.metrics[summary.metric])
        shown = ranked[:CURVES_PER_DATASET]
        for trial in shown:
            history = client.get_metric_history(trial.run_id, summary.metric)
            if not history:
                continue
            history = sorted(history, key=lambda m: m.step)
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trial.params.items())
            ax.plot([m.step for m in history], [m.value for m in history], marker=".",
                    label=label or trial.run_id[:8])  # fmt: skip
        left_out = len(summary.trials) - len(shown)
        ax.set_title(
            f"{summary.dataset} (best {len(shown)} of {len(summary.trials)})"
            if left_out
            else summary.dataset
        )
        ax.set_xlabel("iteration")
        ax.set_ylabel(summary.metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG of exactly its figure size (no tight cropping) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def sweep_plots(client: Any, summaries: list[DatasetSummary], folder: Path) -> list[Path]:
    """Every chart of the sweep, written under ``folder``: the PNG paths."""
    if not summaries:
        return []
    searched = list(dict.fromkeys(k for s in summaries for t in s.trials for k in t.params))
    paths = [save(learning_curves(client, summaries), folder / "learning_curves.png")]
    for param in searched:
        paths.append(save(metric_vs_parameter(summaries, param), folder / f"metric_vs_{param}.png"))
    return paths
