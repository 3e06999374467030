"""The sweep's charts (orchestration.results.sweep_plots), drawn from runs in a real SQLite MLflow
store.

Each chart is checked as a PNG of the expected size, and through the data it was drawn from
(the matplotlib artists), never through its pixels.
"""

from __future__ import annotations

import pytest
from PIL import Image

from orchestration.results.compare import load_trials
from orchestration.results.sweep_plots import (
    DPI,
    PANEL_INCHES,
    learning_curves,
    metric_vs_parameter,
    save,
    sweep_plots,
)
from tests.unit.test_compare import SIGMA, store  # noqa: F401  (the shared store fixture)


@pytest.fixture
def summaries(store):  # noqa: F811
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store["uri"])
    return client, load_trials(client, "cmp")[1]


def test_metric_against_a_parameter_per_dataset(summaries, tmp_path):
    _, datasets = summaries
    fig = metric_vs_parameter(datasets, SIGMA)
    shapes, faces = fig.axes
    assert (shapes.get_title(), shapes.get_ylabel()) == ("shapes", "bbox_mAP")
    points = sorted(map(tuple, shapes.collections[0].get_offsets().tolist()))
    assert [x for x, _ in points] == [1.0, 1.5, 1.5]  # the FAILED trial is left out
    assert [y for _, y in points] == pytest.approx([0.30, 0.36, 0.42])
    mean = shapes.lines[0]
    assert list(mean.get_xdata()) == [1.0, 1.5]
    assert list(mean.get_ydata()) == pytest.approx([0.30, 0.39])
    assert faces.get_ylabel() == "AP_hard" and len(faces.collections[0].get_offsets()) == 2
    path = save(fig, tmp_path / "metric.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(PANEL_INCHES[0] * DPI * 2), int(PANEL_INCHES[1] * DPI))


def test_learning_curves_draw_every_trial_of_a_dataset(summaries):
    client, datasets = summaries
    fig = learning_curves(client, datasets)
    shapes, faces = fig.axes
    assert len(shapes.lines) == 3 and len(faces.lines) == 2  # the FAILED trial logged nothing
    best = max(shapes.lines, key=lambda line: line.get_ydata()[-1])
    assert list(best.get_xdata()) == [10, 20]
    assert list(best.get_ydata()) == pytest.approx([0.21, 0.42])  # both evaluations, in order
    assert best.get_label() == "sigma_init=1.5"


def test_sweep_plots_writes_one_chart_per_searched_parameter(summaries, tmp_path):
    client, datasets = summaries
    paths = sweep_plots(client, datasets, tmp_path / "plots")
    assert [p.name for p in paths] == ["learning_curves.png", f"metric_vs_{SIGMA}.png"]
    for path in paths:
        with Image.open(path) as image:
            image.verify()


def test_learning_curves_of_a_large_sweep_show_its_best_trials(summaries, monkeypatch):
    """A thousand-trial sweep draws (and reads the history of) each dataset's best few."""
    import orchestration.results.sweep_plots as sweep_plots_module

    monkeypatch.setattr(sweep_plots_module, "CURVES_PER_DATASET", 2)
    client, datasets = summaries
    shapes, faces = learning_curves(client, datasets).axes
    assert shapes.get_title() == "shapes (best 2 of 3)"
    finals = sorted(line.get_ydata()[-1] for line in shapes.lines)
    assert finals == pytest.approx([0.36, 0.42])  # the 0.30 trial is left out
    assert faces.get_title() == "faces" and len(faces.lines) == 2  # two trials: both drawn
