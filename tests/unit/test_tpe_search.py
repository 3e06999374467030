"""Optuna TPE over several datasets (orchestration.definition.tpe_search): one study per dataset
and grid point.

The searcher is driven the way Tune drives it (``suggest``, ``on_trial_result``,
``on_trial_complete``, ``save``/``restore``) with real Optuna studies; no Ray cluster is
needed for a searcher's bookkeeping. The sweep's own Tune run of it is in
``tests/integration/test_tpe_sweep.py``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.search_space import sampled_space
from orchestration.definition.tpe_search import PerGroupSearcher, tpe_searcher
from orchestration.definition.trial_experiments import trial_experiment
from tests.unit.test_sweep_config import bad_config

SWEEP = """\
name: tpe
datasets:
  - {{name: shapes, format: coco, root: data/shapes, num_classes: 6, synthetic: true}}
  - {{name: faces, format: widerface, root: data/faces, num_classes: 1, synthetic: true}}
search_space:
  train.schedule: {{grid: [1x, 13e]}}
  model.center_prior.sigma_init: {{uniform: [0.5, 2.0]}}
search: {{algorithm: tpe, num_samples: {samples}, seed: 3}}
output_dir: out
"""
BEST_SIGMA = 1.7


def sweep_config(tmp_path: Path, samples: int):
    path = tmp_path / "tpe.yaml"
    path.write_text(SWEEP.format(samples=samples))
    return load_sweep_config(path)


def unwrap(limited) -> PerGroupSearcher:
    return limited.searcher  # tpe_searcher wraps it in Ray's ConcurrencyLimiter


def run_trial(searcher, trial_id: str, score_of) -> dict:
    """Suggest a config, report two epochs of ``score_of(config)``, complete it."""
    config = searcher.suggest(trial_id)
    score = score_of(config)
    for epoch in (1, 2):
        searcher.on_trial_result(
            trial_id, {"score": score, "epoch": epoch, "training_iteration": epoch}
        )
    searcher.on_trial_complete(trial_id, {"score": score, "training_iteration": 2})
    return config


def test_every_group_gets_its_samples_then_the_search_is_finished(tmp_path):
    sweep = sweep_config(tmp_path, samples=3)
    searcher = unwrap(tpe_searcher(sweep, max_concurrent=4))
    configs = [run_trial(searcher, f"t{i}", lambda c: 0.1) for i in range(12)]
    groups = [(c["dataset"], c["train.schedule"]) for c in configs]
    expected = [(d, s) for d in ("shapes", "faces") for s in ("1x", "13e")]
    assert sorted(groups) == sorted(expected * 3)
    assert searcher.suggest("t12") == PerGroupSearcher.FINISHED
    for config in configs:
        assert 0.5 <= config["model.center_prior.sigma_init"] <= 2.0
        params = {k: v for k, v in config.items() if k != "dataset"}
        experiment = trial_experiment(sweep, sweep.dataset(config["dataset"]), params)
        assert experiment.train.schedule == config["train.schedule"]


def test_a_study_only_learns_from_its_own_dataset(tmp_path):
    sweep = sweep_config(tmp_path, samples=4)
    searcher = unwrap(tpe_searcher(sweep, max_concurrent=4))
    scores = {"shapes": 0.6, "faces": 0.02}
    for i in range(16):
        run_trial(searcher, f"t{i}", lambda c: scores[c["dataset"]])
    for group, study in zip(searcher.groups, searcher.studies):
        values = [t.value for t in study._ot_study.trials]
        assert values == [scores[group["dataset"]]] * 4, group


def test_tpe_moves_towards_the_best_value_it_has_seen(tmp_path):
    sweep = sweep_config(tmp_path, samples=1)
    groups = [{"dataset": "shapes", "train.schedule": "1x"}]
    searcher = PerGroupSearcher(groups, sampled_space(sweep), 60, seed=0)

    def score(config) -> float:
        return -((config["model.center_prior.sigma_init"] - BEST_SIGMA) ** 2)

    sigmas = [
        run_trial(searcher, f"t{i}", score)["model.center_prior.sigma_init"] for i in range(60)
    ]
    first, last = sigmas[:10], sigmas[-15:]  # TPE starts with 10 random draws
    distance = lambda values: statistics.mean(abs(v - BEST_SIGMA) for v in values)  # noqa: E731
    assert distance(last) < 0.5 * distance(first), (distance(first), distance(last))
    assert distance(last) < 0.15


def test_a_failed_trial_without_a_score_is_not_learned_from(tmp_path):
    sweep = sweep_config(tmp_path, samples=2)
    searcher = unwrap(tpe_searcher(sweep, max_concurrent=4))
    searcher.suggest("broken")
    searcher.on_trial_complete("broken", {"training_iteration": 0}, error=True)
    study = searcher.studies[searcher.group_of["broken"]]._ot_study
    assert [t.state.name for t in study.trials] == ["FAIL"]


def test_save_and_restore_continue_the_same_search(tmp_path):
    sweep = sweep_config(tmp_path, samples=2)
    searcher = unwrap(tpe_searcher(sweep, max_concurrent=4))
    for i in range(5):
        run_trial(searcher, f"t{i}", lambda c: 0.3)
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = unwrap(tpe_searcher(sweep, max_concurrent=4))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.started == searcher.started and sum(restored.started) == 5
    rest = [run_trial(restored, f"r{i}", lambda c: 0.3) for i in range(3)]
    assert len(rest) == 3 and restored.suggest("r3") == PerGroupSearcher.FINISHED
    assert sum(len(s._ot_study.trials) for s in restored.studies) == 8


@pytest.mark.parametrize("space", ["{}", "{train.lr: {grid: [0.01, 0.02]}}"])
def test_tpe_without_a_sampled_key_is_a_config_error(tmp_path, space):
    text = (
        "name: t\ndatasets:\n"
        "  - {name: coco, format: coco, root: data/coco, num_classes: 6, synthetic: true}\n"
        f"search_space: {space}\nsearch: {{algorithm: tpe}}\noutput_dir: out\n"
    )
    stderr = bad_config(tmp_path, text)
    assert "search.algorithm: tpe needs at least one sampled key" in stderr
