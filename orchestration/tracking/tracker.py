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

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestration.common.redaction import SECRET_NAME, redact
from orchestration.tracking.retries import OUTAGE_WAIT_S, T, with_retries
from orchestration.tracking.run_search import search_parts, search_runs_in_parts
from orchestration.tracking.tags import (
    MODEL_TRAINING_KIND,
    RUNS_VIEW_KEY,
    SHARED_VIEW_PREFIX,
    TAG_DATASET,
    TAG_EXPERIMENT_KIND,
    TAG_FAILURE,
    TAG_FAILURE_FINAL,
    TAG_FAILURE_LAUNCH,
    TAG_KIND,
    TAG_PARENT,
    TAG_SWEEP_ID,
    TAG_TRIAL_ID,
    VIEW_URL_PARAMETER,
)

logger = logging.getLogger(__name__)


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


class Tracker:
    """The sweep's view of one MLflow experiment."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        artifact_location: str | None = None,
        wait: float = OUTAGE_WAIT_S,
        experiment_id: str | None = None,
    ):
        """``artifact_location``: where a new experiment keeps artifacts (None: the server's
        default, e.g. its ``--artifacts-destination``); ``wait``: how long each call (this
        one's experiment lookup included) waits out an unreachable server before it raises;
        ``experiment_id``: the experiment's id where the caller knows it (a trial, from its
        sweep's driver), which saves the lookup."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.wait = wait
        self.client = MlflowClient(tracking_uri)
        self.experiment_name = experiment_name
        self.search_parts = search_parts(tracking_uri)
        """How many searches at once suit a read of many runs from this store."""
        self.experiment_id = experiment_id or self._retried(
            self._experiment_id, "experiment lookup"
        )
        self._details: dict[str, Future] = {}
        """Params and dataset inputs on their way to new trial runs, by run id."""
        self._sender: ThreadPoolExecutor | None = None

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

    def find_runs(
        self,
        *,
        timeout: float | None = None,
        status: str | None = None,
        parts: int = 1,
        **tags: str,
    ) -> list[Any]:
        """Runs of this experiment carrying every ``tag=value`` (keys as in ``TAG_*``), and
        only those in ``status`` (``RUNNING``, ...) if given; ``timeout``: how long to wait
        out an unreachable server (default :attr:`wait`); ``parts``: read as that many
        searches at once (:func:`~orchestration.tracking.run_search.search_runs_in_parts`;
        :attr:`search_parts` suits this store), for a read of many runs."""
        clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        if status is not None:
            clauses.append(f"attributes.status = '{status}'")
        return self._retried(
            lambda: search_runs_in_parts(
                self.client, self.experiment_id, " and ".join(clauses), parts
            ),
            "run search",
            timeout,
        )

    def get_run(self, run_id: str) -> Any:
        """One run, by id (a lookup by key: as fast at a million runs as at ten)."""
        return self._retried(lambda: self.client.get_run(run_id), "run lookup")

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
        existing: Any | None,
        sweep_id: str,
        parent_run_id: str,
        trial_id: str,
        name: str,
        dataset: str,
        params: Mapping[str, Any],
        dataset_input: DatasetInput | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> str:
        """The trial's child run id: ``existing`` (what :meth:`find_trial_run` found, on a
        restart) or a new run when that is None. The caller looks the run up itself, once:
        each lookup is a search of the experiment, whose runs a big sweep counts in thousands.

        A found run that had ended is RUNNING again, without the failure tags of its end.

        A new run exists when this returns; its ``params`` and ``dataset_input`` are sent by a
        background thread meanwhile (two requests the training need not wait for: against a
        loaded server they were most of a trial's start). :meth:`end_run` waits for them, as
        does :meth:`run_details_logged`.
        """
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
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow-run-details")
        self._details[run_id] = self._sender.submit(
            self._log_details, run_id, dict(params), dataset_input
        )
        return run_id

    def _log_details(
        self, run_id: str, params: Mapping[str, Any], dataset_input: DatasetInput | None
    ) -> None:
        self.log_params(run_id, params)
        if dataset_input is not None:
            self.log_dataset(run_id, dataset_input)

    def run_details_logged(self, run_id: str) -> None:
        """Wait until the params and dataset input :meth:`trial_run` sends in the background
        are in the run; raises what stopped them (after the usual wait for the server)."""
        sending = self._details.pop(run_id, None)
        if sending is None:
            return
        try:
            sending.result()
        finally:
            if not self._details and self._sender is not None:
                self._sender.shutdown()  # its thread ends (a trial process runs many trials)
                self._sender = None

    def _reopen(self, run: Any) -> None:
        run_id = run.info.run_id
        for key in (TAG_FAILURE, TAG_FAILURE_FINAL, TAG_FAILURE_LAUNCH):
            if key in run.data.tags:
                self._retried(lambda key=key: self.client.delete_tag(run_id, key), "tag removal")
        self._retried(lambda: self.client.update_run(run_id, status="RUNNING"), "run reopen")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log ``params`` (secrets left out); MLflow's client sends them 100 to a request."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(safe_params(params).items())]
        self._retried(lambda: self.client.log_batch(run_id, params=items), "params")

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
        """Set ``tags`` on the run; MLflow's client sends them 100 to a request."""
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        self._retried(lambda: self.client.log_batch(run_id, tags=items), "tags", timeout)

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
        first (and the run's params sent first, if :meth:`trial_run` is still sending them);
        ``timeout``: how long each call waits out an unreachable server."""
        self.run_details_logged(run_id)
        extra = {**(tags or {}), **({TAG_FAILURE: reason} if reason else {})}
        if extra:
            self.set_tags(run_id, extra, timeout=timeout)
        self._retried(lambda: self.client.set_terminated(run_id, status=status), "run end", timeout)

    def failure_reason(self, run_id: str) -> str | None:
        """The reason tagged on a FAILED run; None when the run has not failed."""
        run = self.get_run(run_id)
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
    def of(dataset: Any) -> DatasetInput:
        """A sweep's dataset (its ``name``, ``root``, ``format`` and ``train_split``) as the
        input its trials train on."""
        return DatasetInput.describe(
            dataset.name, str(dataset.root), dataset.format, dataset.train_split
        )

    @staticmethod
    def describe(name: str, root: str, format: str, split: str) -> DatasetInput:
        digest = hashlib.sha256(f"{format}:{root}:{split}".encode()).hexdigest()[:16]
        return DatasetInput(name=f"{name} ({format} {split})", source=str(root), digest=digest)
