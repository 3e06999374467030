"""Ray Train's switches for the Ray a sweep starts on its own machine, and Tune's reuse of
trial drivers."""

from __future__ import annotations

from orchestration.definition.config_loading import load_sweep_config
from orchestration.running.tune_run import (
    LOCAL_RAY_TRAIN_SETTINGS,
    TUNE_RESULT_FILES_OFF,
    apply_local_ray_train_settings,
    reuses_trial_drivers,
)
from tests.unit.test_score_rule import sweep_file


def test_a_local_ray_runs_train_without_preemption_watcher_or_metrics_and_polls_faster():
    environ: dict[str, str] = {}
    settings = apply_local_ray_train_settings(environ)
    assert (
        environ
        == settings
        == {
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "RAY_TRAIN_METRICS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        }
    )


def test_a_value_the_user_set_wins():
    environ = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "PATH": "/bin"}
    settings = apply_local_ray_train_settings(environ)
    assert settings["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2.0"
    assert environ["PATH"] == "/bin"
    assert set(settings) == set(LOCAL_RAY_TRAIN_SETTINGS)


def test_ray_train_reads_each_switch_by_the_name_used_here():
    """The names are Ray Train's own: a rename in Ray would silently turn a switch off."""
    from ray.train.v2._internal import constants

    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR in LOCAL_RAY_TRAIN_SETTINGS
    assert constants.METRICS_ENABLED_ENV_VAR in LOCAL_RAY_TRAIN_SETTINGS
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR in LOCAL_RAY_TRAIN_SETTINGS


def test_trial_drivers_are_reused_only_where_no_trial_is_stopped_early(tmp_path):
    fifo = load_sweep_config(sweep_file(tmp_path, scheduler={"type": "fifo"}))
    asha = load_sweep_config(sweep_file(tmp_path, scheduler={"type": "asha", "grace_period": 4}))
    assert reuses_trial_drivers(fifo) is True
    assert reuses_trial_drivers(asha) is False


def test_tune_writes_no_result_files_of_its_own_under_the_switch_used_here(monkeypatch):
    """The switch's name is Tune's own: a rename in Ray would bring the files back."""
    from ray.tune.logger import LoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    with_files = _create_default_callbacks([], metric="score")
    assert any(isinstance(callback, LoggerCallback) for callback in with_files)
    for name, value in TUNE_RESULT_FILES_OFF.items():
        monkeypatch.setenv(name, value)
    without = _create_default_callbacks([], metric="score")
    assert not [callback for callback in without if isinstance(callback, LoggerCallback)]
