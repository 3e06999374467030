"""The runs-table view a sweep stores for the MLflow UI (orchestration.tracking), on a real
SQLite store. What the browser shows with it is checked in tests/integration/test_sweep.py."""

from __future__ import annotations

import json

from orchestration.definition.sweep_config import SweepConfig
from orchestration.running.parent_run import runs_view_metrics
from orchestration.tracking.tags import MODEL_TRAINING_KIND, SHARED_VIEW_PREFIX, TAG_EXPERIMENT_KIND
from orchestration.tracking.tracker import Tracker


def test_the_view_is_an_experiment_tag_the_printed_link_opens(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "view")
    tracker.publish_runs_view(["bbox_mAP", "AP_hard", "bbox_mAP"], ["train.lr"])
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[TAG_EXPERIMENT_KIND] == MODEL_TRAINING_KIND
    view = json.loads(tags[SHARED_VIEW_PREFIX + "autoassign-sweep"])
    assert view == {
        "selectedColumns": [
            "attributes.`Dataset`",
            "attributes.`Models`",
            "params.`train.lr`",
            "metrics.`bbox_mAP`",
            "metrics.`AP_hard`",
        ]
    }
    url = tracker.runs_table_url("http://127.0.0.1:5000/", with_view=True)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
        "?viewStateShareKey=autoassign-sweep"
    )
    assert tracker.runs_table_url(None) is None  # a SQLite store has no UI of its own


def test_a_kind_the_user_chose_is_kept(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "view")
    tracker.client.set_experiment_tag(
        tracker.experiment_id, TAG_EXPERIMENT_KIND, "genai_development"
    )
    tracker.publish_runs_view(["mAP"], [])
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[TAG_EXPERIMENT_KIND] == "genai_development"


def test_view_metrics_are_each_protocols_headline_once():
    sweep = SweepConfig.model_validate(
        {
            "name": "v",
            "datasets": [
                {"name": "a", "format": "coco", "root": "x", "num_classes": 2},
                {"name": "b", "format": "objects365", "root": "y", "num_classes": 2},
                {"name": "c", "format": "widerface", "root": "z", "num_classes": 1},
                {"name": "d", "format": "voc", "root": "w", "num_classes": 3, "metric": "mAP_area"},
            ],
            "base": {},
        }
    )
    assert runs_view_metrics(sweep) == [
        "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "AP_hard", "AP_easy", "AP_medium",
        "mAP_area", "mAP",
    ]  # fmt: skip
