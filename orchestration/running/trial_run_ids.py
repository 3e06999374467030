"""The MLflow run each trial of a sweep opened, remembered in the Ray cluster's own key-value
store, so that a starting trial need not search MLflow for it.

A trial driver that starts must know whether its trial ran before: a restarted trial
continues its own MLflow run. MLflow can only tell by a search of the experiment by tags,
which its SQL stores answer in a time that grows with the experiment's runs (on PostgreSQL
here, 8 ms at 100 runs, 27 ms at 400), and a big sweep starts thousands of trials. Ray's GCS
answers in under a millisecond whatever the size: the first start of a trial of a new sweep
finds nothing and opens a run without asking MLflow; a restart finds its run's id and reads
that one run.

Ray offers this store in ``ray.experimental.internal_kv``, which its own libraries use but
do not document; where it is missing or fails, :func:`recall` raises :class:`Unavailable` and
the caller searches MLflow instead, as it does for a resumed sweep (whose trials ran under
another Ray).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

NAMESPACE = "autoassign"


class Unavailable(RuntimeError):
    """Ray's key-value store cannot be read or written from this process."""


def _key(sweep_id: str, trial_id: str = "") -> bytes:
    return f"trial-run/{sweep_id}/{trial_id}".encode()


def _store():
    try:
        from ray.experimental import internal_kv
    except ImportError as error:  # a Ray that moved it
        raise Unavailable(str(error)) from error
    if not internal_kv._internal_kv_initialized():  # not in a process of a Ray cluster
        raise Unavailable("not connected to Ray")
    return internal_kv


def recall(sweep_id: str, trial_id: str) -> str | None:
    """The run id a start of this trial remembered, or None (raises :class:`Unavailable`)."""
    store = _store()
    try:
        value = store._internal_kv_get(_key(sweep_id, trial_id), namespace=NAMESPACE)
    except Exception as error:
        raise Unavailable(str(error)) from error
    return value.decode() if value is not None else None


def remember(sweep_id: str, trial_id: str, run_id: str) -> None:
    """Keep the trial's run id for its restarts (where :func:`recall` cannot read the store
    either, they search MLflow)."""
    try:
        store = _store()
    except Unavailable:
        return
    try:
        store._internal_kv_put(
            _key(sweep_id, trial_id), run_id.encode(), overwrite=True, namespace=NAMESPACE
        )
    except Exception as error:
        # Its restarts would not find the run, and would open another.
        logger.warning("run id of trial %s not remembered in Ray: %s", trial_id, error)


def forget_sweep(sweep_id: str) -> None:
    """Drop what the sweep's trials remembered (at its end: a long-lived cluster runs many)."""
    try:
        _store()._internal_kv_del(_key(sweep_id), del_by_prefix=True, namespace=NAMESPACE)
    except Exception as error:
        logger.debug("run ids of sweep %s not dropped: %s", sweep_id, error)
