"""Two sweeps registering into the same registry at once (orchestration.tracking.registry) on a real
SQLite MLflow store: the ``best`` alias ends on the better version whatever the interleaving.

MLflow has no compare-and-set for aliases. The interleaving tests run the bad order by hand:
one registrant is held just before an MLflow call (a thin wrapper around a real client that
waits on an event there) while the other registers from start to end. The process test lets
two processes race for real, many rounds.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestration.running.storage import Storage
from orchestration.tracking.registry import (
    BEST_ALIAS,
    DatasetIdentity,
    register_best,
    register_version,
)
from tests.unit.test_registry_identity import (
    COCO_CLASSES,
    DEMO_CLASSES,
    REAL,
    write_checkpoint,
)

WAIT_S = 120  # only a hang fails on it


class HeldClient:
    """A real ``MlflowClient`` whose first call of ``method`` waits until :meth:`release`;
    :attr:`held` is set when it starts waiting. Everything else goes straight through."""

    def __init__(self, client: Any, method: str):
        self._client, self._method = client, method
        self.held, self._released, self._waited = threading.Event(), threading.Event(), False

    def release(self) -> None:
        self._released.set()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name != self._method or self._waited:
            return attribute

        def held_call(*args, **kwargs):
            self._waited = True
            self.held.set()
            assert self._released.wait(WAIT_S), "never released"
            return attribute(*args, **kwargs)

        return held_call


def in_thread(function) -> tuple[threading.Thread, dict]:
    """Run ``function`` in a thread; its result (or exception) lands in the dict."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised by the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until_held(client: HeldClient, thread: threading.Thread, outcome: dict) -> None:
    """Return once ``client`` is held; raise what the thread raised if it ended first."""
    while not client.held.wait(0.1):
        if not thread.is_alive():
            raise outcome.get("error") or AssertionError("finished without being held")


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, experiment


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        name: write_checkpoint(root / name, classes, split, seed=seed)
        for name, classes, split, seed in (
            ("a", COCO_CLASSES, "val2017", 0),
            ("b", COCO_CLASSES, "val2017", 1),
            ("c", COCO_CLASSES, "val2017", 2),
            ("demo", DEMO_CLASSES, "val", 3),
        )
    }


def sweep(store, client, checkpoint: Path, value: float) -> list:
    _, plain, experiment = store
    run = plain.create_run(experiment)
    row = {"status": "ok", "dataset": "coco", "metric": "bbox_mAP", "value": value,
           "run_id": run.info.run_id, "checkpoint": str(checkpoint)}  # fmt: skip
    return register_best(client, [row], storage=Storage(root="."), sweep_id=str(value))


def best(client) -> str:
    return str(client.get_model_version_by_alias("autoassign-coco", BEST_ALIAS).version)


def test_a_late_write_of_a_worse_sweep_does_not_keep_best(store, checkpoints):
    from mlflow.tracking import MlflowClient

    uri, client, _ = store
    sweep(store, client, checkpoints["a"], 0.30)  # version 1 holds best
    # The worse sweep has looked at the registry and is about to move best to its version...
    worse = HeldClient(MlflowClient(uri), "set_registered_model_alias")
    thread, outcome = in_thread(lambda: sweep(store, worse, checkpoints["b"], 0.40))
    wait_until_held(worse, thread, outcome)
    # ...when the better one registers from start to end,
    (better,) = sweep(store, MlflowClient(uri), checkpoints["c"], 0.50)
    # and only then does the worse one's write land.
    worse.release()
    thread.join(WAIT_S)
    if "error" in outcome:
        raise outcome["error"]
    (late,) = outcome["result"]
    assert (late.version, better.version) == ("2", "3")
    assert best(client) == "3"
    assert better.became_best and not late.became_best
    assert late.comparison == "bbox_mAP 0.4000 <= 0.5000 of version 3, which is best"


class RacedClient:
    """A real ``MlflowClient`` whose first ``set_registered_model_alias`` loses a race:
    ``competitor()`` registers from start to end first (for real), then the store refuses this
    write the way SQLite did when two processes set the alias at once (its unique key on the
    alias row). That timing cannot be forced for real, so the refusal is raised by hand, with
    the message a real race produced."""

    REFUSAL = (
        "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace,"
        " registered_model_aliases.name, registered_model_aliases.alias"
    )

    def __init__(self, client: Any, competitor):
        self._client, self._competitor, self._raced = client, competitor, False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name != "set_registered_model_alias" or self._raced:
            return attribute

        def raced_call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            self._raced = True
            self._competitor()
            raise MlflowException(self.REFUSAL, error_code="BAD_REQUEST")

        return raced_call


def test_an_alias_write_refused_by_a_concurrent_one_is_settled_again(store, checkpoints):
    from mlflow.tracking import MlflowClient

    uri, client, _ = store
    sweep(store, client, checkpoints["a"], 0.30)  # version 1 holds best
    competitor = []
    raced = RacedClient(
        MlflowClient(uri),
        lambda: competitor.extend(sweep(store, MlflowClient(uri), checkpoints["c"], 0.50)),
    )
    (mine,) = sweep(store, raced, checkpoints["b"], 0.40)  # no error: it lists again
    assert (mine.version, competitor[0].version) == ("2", "3")
    assert best(client) == "3"
    assert competitor[0].became_best and not mine.became_best
    assert mine.comparison == "bbox_mAP 0.4000 <= 0.5000 of version 3, which is best"


def test_two_datasets_claiming_a_model_from_before_identities_at_once(store, checkpoints, capsys):
    from mlflow.tracking import MlflowClient

    uri, client, _ = store
    client.create_registered_model("autoassign-coco")  # as the registry made it before
    # The demo has found the model without an identity and is about to create its version...
    demo = HeldClient(MlflowClient(uri), "create_model_version")
    thread, outcome = in_thread(lambda: sweep(store, demo, checkpoints["demo"], 0.431))
    wait_until_held(demo, thread, outcome)
    # ...when the real COCO sweep registers the model's first version with an identity.
    (real,) = sweep(store, MlflowClient(uri), checkpoints["a"], 0.40)
    demo.release()
    thread.join(WAIT_S)
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["result"] == []  # the demo's version was taken back: refused
    assert f"autoassign-coco holds models of {REAL}" in capsys.readouterr().err
    versions = client.search_model_versions("name = 'autoassign-coco'")
    assert [str(v.version) for v in versions] == [real.version] == ["1"]
    assert best(client) == "1"


IDENTITY = DatasetIdentity("coco", ("person", "car"), "val2017", "bbox_mAP")
ROUNDS = 16


def race_values() -> list[tuple[float, float]]:
    """Per round, the value each process registers: mostly random (either may win, or
    neither beat the best so far), plus ties within a round and with an earlier best."""
    rng = random.Random(0)
    values = [(round(rng.random(), 3), round(rng.random(), 3)) for _ in range(ROUNDS)]
    values[3] = (0.995, 0.995)
    values[9] = (0.995, 0.2)
    values[12] = (0.999, 0.998)
    return values


def racer(uri: str, run_id: str, index: int, barrier: Any) -> None:
    """One process: each round, wait for the start, register, wait for the check."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for pair in race_values():
        barrier.wait(WAIT_S)
        register_version(
            client, "autoassign-coco", run_id=run_id, identity=IDENTITY, value=pair[index]
        )
        barrier.wait(WAIT_S)


def test_two_processes_registering_at_once_leave_best_on_the_best(store):
    uri, client, experiment = store
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    racers = [
        context.Process(target=racer, args=(uri, runs[i], i, barrier), daemon=True)
        for i in range(2)
    ]
    for process in racers:
        process.start()
    try:
        for round_, pair in enumerate(race_values()):
            barrier.wait(WAIT_S)  # both go
            barrier.wait(WAIT_S)  # both done
            versions = client.search_model_versions("name = 'autoassign-coco'")
            assert len(versions) == 2 * (round_ + 1)
            values = {int(v.version): float(v.tags["autoassign.metric_value"]) for v in versions}
            top = max(values.values())
            earliest_top = min(number for number, value in values.items() if value == top)
            assert best(client) == str(earliest_top), (round_, pair, values)
    except BaseException:
        # Free the racers from their wait; only on failure, since after the last round a
        # racer may not yet have woken from the barrier that released it, and aborting then
        # breaks that wait (BrokenBarrierError in a racer that did everything right).
        barrier.abort()
        raise
    finally:
        for process in racers:
            process.join(WAIT_S)
    assert [process.exitcode for process in racers] == [0, 0]
