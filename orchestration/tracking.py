"""MLflow for sweeps: a parent run per sweep, a child run per trial, never left RUNNING.

Ray's own ``MLflowLoggerCallback`` / ``setup_mlflow`` open a new run on every restore, know no
parent runs and leave runs RUNNING when a driver dies. This layer instead:

- finds runs by tags (``autoassign.sweep_id``, ``autoassign.trial_id``), so a restarted trial
  or a resumed sweep continues its own run instead of opening a second one;
- waits out a tracking server that is down: every call is retried for up to
  :data:`OUTAGE_WAIT_S` seconds (one setting for trial start and the final metric flush), and
  metrics are buffered and retried (:class:`MetricBuffer`), so an outage loses nothing (bound:
  :data:`MAX_BUFFERED_POINTS` points);
- ends each run FINISHED, FAILED (with ``autoassign.failure_reason``) or KILLED (early-stopped
  trials tagged ``autoassign.early_stopped``);
- never logs a secret: URIs are logged with their credentials removed (:func:`redact`).

Only the MLflow client API is used (``MlflowClient``), never the global ``mlflow.start_run``
state, so many trials in one process do not step on each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestration.redaction import SECRET_NAME, redact

logger = logging.getLogger(__name__)

TAG_SWEEP_ID = "autoassign.sweep_id"
TAG_TRIAL_ID = "autoassign.trial_id"
TAG_DATASET = "autoassign.dataset"
TAG_FORMAT = "autoassign.format"  # the dataset's on-disk format, hence its protocol
TAG_METRIC = "autoassign.metric"  # the metric that ranks the dataset's trials
TAG_CHECKPOINT = "autoassign.checkpoint_uri"
TAG_KIND = "autoassign.kind"  # "sweep" or "trial"
TAG_FAILURE = "autoassign.failure_reason"
# A FAILED trial run that no restart can fix ("true": its loss went non-finite) ...
TAG_FAILURE_FINAL = "autoassign.failure_final"
# ... or that failed under a trial driver of this launch of the sweep (see trial.py).
TAG_FAILURE_LAUNCH = "autoassign.failure_launch"
TAG_EARLY_STOPPED = "autoassign.early_stopped"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
# The MLflow UI's own experiment tags: what kind of experiment it is, and shared views.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_URL_PARAMETER = "viewStateShareKey"
RUNS_VIEW_KEY = "autoassign-sweep"

OUTAGE_WAIT_S = 300.0
"""How long an unreachable tracking server is waited out before a call gives up: a trial's
start (finding or opening its run), every :class:`Tracker` call and the final flush of a
trial's buffered metrics all use this one bound."""

MAX_BUFFERED_POINTS = 200_000
"""Metric points kept while the server is unreachable; beyond this the oldest are dropped
(and a warning says how many)."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as MLflow strings, dropping any whose name looks like a secret."""
    shown = {}
    for key, value in params.items():
        if SECRET_NAME.search(key):
            continue
        text = redact(value) if isinstance(value, str) else value
        shown[key] = str(text)[:6000]
    return shown


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------------------
# Retrying
# --------------------------------------------------------------------------------------------


def quiet_mlflow_output() -> None:
    """No "View run at <tracking URI>" lines from MLflow (they repeat on every run end, and
    the URI they print may carry credentials) and no progress bar per artifact copy."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_client_retries() -> None:
    """Make each MLflow HTTP call fail fast; :func:`with_retries` and the buffer retry instead.

    MLflow's own retries block a training step for minutes against a server that is down.
    """
    quiet_mlflow_output()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


@contextlib.contextmanager
def fail_fast_requests() -> Iterator[None]:
    """Inside the block, each MLflow HTTP call tries once and gives up within seconds.

    For code that must not block (Ray Tune's callbacks run in its event loop) and retries
    later itself. MLflow reads these variables on every request; they are put back after.
    """
    fast = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    saved = {name: os.environ.get(name) for name in fast}
    os.environ.update(fast)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_retries(call: Callable[[], T], *, what: str, timeout: float = OUTAGE_WAIT_S) -> T:
    """``call()``, retried with backoff for up to ``timeout`` seconds on any error."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as error:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("MLflow %s failed (%s); retrying in %.0f s", what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


@dataclass
class MetricBuffer:
    """Metrics waiting to reach the server; sent in batches, kept while sending fails."""

    client: Any
    run_id: str
    pending: list[Any] = field(default_factory=list)
    dropped: int = 0
    last_error: str | None = None

    def add(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self.pending.append(Metric(key, float(value), now, int(step)))
        overflow = len(self.pending) - MAX_BUFFERED_POINTS
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
            logger.warning("MLflow unreachable: dropped %d oldest metric points", self.dropped)

    def flush(self) -> bool:
        """Try once to send everything pending; True when nothing is left."""
        while self.pending:
            chunk = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as error:
                if self.last_error is None:
                    logger.warning("MLflow unreachable (%s); keeping metrics to retry", error)
                self.last_error = str(error)
                return False
            del self.pending[: len(chunk)]
        if self.last_error is not None:
            logger.warning("MLflow reachable again; buffered metrics sent")
            self.last_error = None
        return True

    def close(self, *, timeout: float = OUTAGE_WAIT_S) -> None:
        """Flush, retrying for up to ``timeout`` seconds; raise if the server never answers."""
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"MLflow unreachable for {timeout:.0f} s at the end of the run; "
                    f"{len(self.pending)} metric points not logged ({self.last_error})"
                )
            time.sleep(2.0)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


class Tracker:
    """The sweep's view of one MLflow experiment."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        artifact_location: str | None = None,
        wait: float = OUTAGE_WAIT_S,
    ):
        """``artifact_location``: where a new experiment keeps artifacts (None: the server's
        default, e.g. its ``--artifacts-destination``); ``wait``: how long each call (this
        one's experiment lookup included) waits out an unreachable server before it raises."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.wait = wait
        self.client = MlflowClient(tracking_uri)
        self.experiment_name = experiment_name
        self.experiment_id = self._retried(self._experiment_id, "experiment lookup")

    def _retried(self, call: Callable[[], T], what: str, timeout: float | None = None) -> T:
        return with_retries(call, what=what, timeout=self.wait if timeout is None else timeout)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location
            )
        except Exception:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    # ---- finding --------------------------------------------------------------------------

    def find_runs(self, *, timeout: float | None = None, **tags: str) -> list[Any]:
        """Runs of this experiment carrying every ``tag=value`` (keys as in ``TAG_*``);
        ``timeout``: how long to wait out an unreachable server (default :attr:`wait`)."""
        clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        return self._retried(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=" and ".join(clauses), max_results=1000
            ),
            "run search",
            timeout,
        )

    def find_trial_run(self, sweep_id: str, trial_id: str) -> Any | None:
        """The MLflow run of a sweep's trial, or None before its first start."""
        runs = self.find_runs(**{TAG_SWEEP_ID: sweep_id, TAG_TRIAL_ID: trial_id})
        return runs[0] if runs else None

    # ---- parent -----------------------------------------------------------------------------

    def parent_run(self, sweep_id: str, *, name: str, tags: Mapping[str, str]) -> str:
        """The sweep's parent run id: the existing one (a resume, reopened without the
        failure tags of its end, as a trial's run is) or a new one."""
        existing = self.find_runs(**{TAG_SWEEP_ID: sweep_id, TAG_KIND: "sweep"})
        if existing:
            if existing[0].info.status != "RUNNING":
                self._reopen(existing[0])
            return existing[0].info.run_id
        run = self._retried(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={TAG_SWEEP_ID: sweep_id, TAG_KIND: "sweep", **tags},
            ),
            "run creation",
        )
        return run.info.run_id

    # ---- children ---------------------------------------------------------------------------

    def trial_run(
        self,
        *,
        sweep_id: str,
        parent_run_id: str,
        trial_id: str,
        name: str,
        dataset: str,
        params: Mapping[str, Any],
        dataset_input: DatasetInput | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> str:
        """The trial's child run id: found by tags when it exists (a restart), else created.

        A found run that had ended is RUNNING again, without the failure tags of its end.
        """
        existing = self.find_trial_run(sweep_id, trial_id)
        if existing is not None:
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self._reopen(existing)
            return run_id
        tags = {
            TAG_SWEEP_ID: sweep_id,
            TAG_TRIAL_ID: trial_id,
            TAG_KIND: "trial",
            TAG_DATASET: dataset,
            TAG_PARENT: parent_run_id,
            **(extra_tags or {}),
        }
        run = self._retried(
            lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags),
            "run creation",
        )
        run_id = run.info.run_id
        self.log_params(run_id, params)
        if dataset_input is not None:
            self.log_dataset(run_id, dataset_input)
        return run_id

    def _reopen(self, run: Any) -> None:
        run_id = run.info.run_id
        for key in (TAG_FAILURE, TAG_FAILURE_FINAL, TAG_FAILURE_LAUNCH):
            if key in run.data.tags:
                self._retried(lambda key=key: self.client.delete_tag(run_id, key), "tag removal")
        self._retried(lambda: self.client.update_run(run_id, status="RUNNING"), "run reopen")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(safe_params(params).items())]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self._retried(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk), "params")

    def log_dataset(self, run_id: str, dataset: DatasetInput) -> None:
        """The dataset as an MLflow dataset input (the runs table's Dataset column)."""
        from mlflow.entities import Dataset, InputTag
        from mlflow.entities import DatasetInput as MlflowDatasetInput

        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type="local" if "://" not in dataset.source else dataset.source.split(":")[0],
            source=dataset.source,
        )
        tags = [InputTag(key="mlflow.data.context", value=dataset.context)]
        self._retried(
            lambda: self.client.log_inputs(run_id, [MlflowDatasetInput(entity, tags)]),
            "dataset input",
        )

    def set_tags(
        self, run_id: str, tags: Mapping[str, str], *, timeout: float | None = None
    ) -> None:
        for key, value in tags.items():
            self._retried(
                lambda key=key, value=value: self.client.set_tag(run_id, key, str(value)[:5000]),
                "tag",
                timeout,
            )

    def log_artifact(self, run_id: str, path: str | os.PathLike, folder: str | None = None) -> None:
        self._retried(
            lambda: self.client.log_artifact(run_id, str(path), folder), "artifact upload"
        )

    def end_run(
        self,
        run_id: str,
        status: str,
        *,
        reason: str | None = None,
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """End a run as FINISHED, FAILED (``reason`` tagged) or KILLED, with ``tags`` set
        first; ``timeout``: how long each call waits out an unreachable server."""
        extra = {**(tags or {}), **({TAG_FAILURE: reason} if reason else {})}
        if extra:
            self.set_tags(run_id, extra, timeout=timeout)
        self._retried(lambda: self.client.set_terminated(run_id, status=status), "run end", timeout)

    def failure_reason(self, run_id: str) -> str | None:
        """The reason tagged on a FAILED run; None when the run has not failed."""
        run = self._retried(lambda: self.client.get_run(run_id), "run lookup")
        if run.info.status != "FAILED":
            return None
        return run.data.tags.get(TAG_FAILURE, "the trial failed")

    def close_stale_runs(self, sweep_id: str, keep: Iterable[str] = ()) -> list[str]:
        """End as KILLED every RUNNING trial run of the sweep not in ``keep``; their ids."""
        keep = set(keep)
        closed = []
        for run in self.find_runs(**{TAG_SWEEP_ID: sweep_id, TAG_KIND: "trial"}):
            if run.info.status == "RUNNING" and run.info.run_id not in keep:
                self.end_run(run.info.run_id, "KILLED", reason="the sweep driver stopped")
                closed.append(run.info.run_id)
        return closed

    def runs_table_url(self, ui_url: str | None, *, with_view: bool = False) -> str | None:
        """The UI link to the experiment's runs table (MLflow 3 otherwise opens elsewhere);
        ``with_view``: opened in the view :meth:`publish_runs_view` stored."""
        base = ui_url or (self.tracking_uri if self.tracking_uri.startswith("http") else None)
        if base is None:
            return None
        url = f"{redact(base.rstrip('/'))}/#/experiments/{self.experiment_id}/runs"
        return f"{url}?{VIEW_URL_PARAMETER}={RUNS_VIEW_KEY}" if with_view else url

    def publish_runs_view(self, metrics: Iterable[str], params: Iterable[str]) -> None:
        """Store the runs-table view a sweep is compared in, as an MLflow shared view.

        MLflow 3 opens a new experiment on its GenAI overview and shows no metric column
        until the user picks them; this marks the experiment as model training and stores
        (in the experiment tag the UI's "share view" uses) a view with the Dataset column,
        the searched ``params`` and the protocols' key ``metrics`` as columns.
        :meth:`runs_table_url` with ``with_view`` opens it.
        """
        experiment = self._retried(
            lambda: self.client.get_experiment(self.experiment_id), "experiment lookup"
        )
        if TAG_EXPERIMENT_KIND not in experiment.tags:
            self._retried(
                lambda: self.client.set_experiment_tag(
                    self.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING_KIND
                ),
                "experiment tag",
            )
        view = json.dumps(runs_view_state(metrics, params))
        self._retried(
            lambda: self.client.set_experiment_tag(
                self.experiment_id, SHARED_VIEW_PREFIX + RUNS_VIEW_KEY, view
            ),
            "experiment tag",
        )


def runs_view_state(metrics: Iterable[str], params: Iterable[str]) -> dict[str, Any]:
    """The MLflow UI's runs-table state for a sweep: which columns show, in order.

    Column keys are the UI's own: ``attributes.`Dataset```, ``params.`train.lr```,
    ``metrics.`bbox_mAP```. Expanded parents are per-user state the UI never shares: the
    children appear under their parent when the user opens it (the ``+`` beside its name).
    """
    columns = ["attributes.`Dataset`", "attributes.`Models`"]
    columns += [f"params.`{key}`" for key in dict.fromkeys(params)]
    columns += [f"metrics.`{key}`" for key in dict.fromkeys(metrics)]
    return {"selectedColumns": columns}


@dataclass(frozen=True)
class DatasetInput:
    """What the runs table shows in its Dataset column for a trial."""

    name: str
    source: str
    digest: str
    context: str = "training"

    @staticmethod
    def describe(name: str, root: str, format: str, split: str) -> DatasetInput:
        digest = hashlib.sha256(f"{format}:{root}:{split}".encode()).hexdigest()[:16]
        return DatasetInput(name=f"{name} ({format} {split})", source=str(root), digest=digest)
