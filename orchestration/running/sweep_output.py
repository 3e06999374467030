"""What a sweep prints on the terminal, and where everything else goes.

The terminal gets what a person follows a sweep by: the plan, one line per trial per epoch
and one when a trial ends, fails, is stopped early or is restarted
(:mod:`orchestration.running.trial_progress`), the registry, the leaderboard, and the project's own
warnings (a tracking server being waited for, a non-finite loss). Everything else goes to
``<output_dir>/sweep.log``
(:class:`SweepOutput`): the output of every Ray process (Train workers, controllers, Ray's
own actors), which Ray forwards to the driver; what the libraries print in the driver itself
(Tune's experiment header, Ray's raylet notices); Ray's, Tune's and MLflow's log records;
Python warnings; and a copy of each terminal line, with times.

``--verbose`` leaves Ray, Tune and MLflow as they are: their lines and Tune's trial table
come back on the terminal (the log file then holds the sweep's own records only).

Only switches the libraries offer are used (their loggers, Tune's ``verbose``, Ray's
handler of forwarded process output, MLflow's ``MLFLOW_CONFIGURE_LOGGING``); no text is
filtered, so an error keeps every word: a failed trial's line shows the error's message.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

LOG_FILE = "sweep.log"
PROJECT_LOGGERS = ("orchestration", "autoassign")
"""Whose warnings reach the terminal by default."""
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "sqlalchemy.engine")
"""Loggers whose libraries give them a terminal handler of their own."""

_terminal_log = logging.getLogger("orchestration.terminal")
_terminal: TextIO | None = None
"""The terminal's stream while a :class:`SweepOutput` sends ``sys.stdout`` to the log."""


def say(text: str) -> None:
    """A line for the person running the sweep: on the terminal, and in the sweep's log."""
    print(text, file=_terminal or sys.stdout, flush=True)
    _terminal_log.info(text)


class SweepOutput:
    """Sends what is not for the terminal to ``log_path`` while the block runs.

    Use around the whole sweep; :meth:`route_ray_processes` once Ray is up.
    """

    def __init__(self, log_path: Path, *, verbose: bool = False):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._file: logging.Handler | None = None
        self._terminal: logging.Handler | None = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._saved_root_level = logging.NOTSET
        self._stdout: TextIO | None = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> SweepOutput:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(self.log_path, encoding="utf-8")
        self._file.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self._terminal = logging.StreamHandler(sys.stderr)
        self._terminal.setLevel(logging.WARNING)
        self._terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        self._saved_root_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self._file)
        root.addHandler(self._terminal)
        if not self.verbose:
            # Warnings of the project only: Ray's and MLflow's go to the file.
            self._terminal.addFilter(lambda record: record.name.startswith(PROJECT_LOGGERS))
            # MLflow configures its loggers when first imported, unless told not to; Ray
            # colours the prefixes of its processes' lines unless told not to.
            for name, value in (("MLFLOW_CONFIGURE_LOGGING", "false"), ("RAY_COLOR_PREFIX", "0")):
                self._saved_env[name] = os.environ.get(name)
                os.environ[name] = value
            # Ray gives its logger a terminal handler when first imported: import it now, so
            # that what is undone here is not done again later.
            import ray  # noqa: F401

            for name in LIBRARY_LOGGERS:
                library = logging.getLogger(name)
                self._saved.append((library, list(library.handlers), library.propagate))
                library.handlers = []
                library.propagate = True
            logging.captureWarnings(True)
            # What the libraries print in this process (Tune's experiment header even at
            # verbose 0, Ray's raylet notices): the terminal keeps :func:`say`'s lines only.
            global _terminal
            self._stdout = _terminal = sys.stdout
            sys.stdout = _LineWriter(logging.getLogger("stdout"))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global _terminal
        if self._stdout is not None:
            sys.stdout, _terminal = self._stdout, None
        logging.captureWarnings(False)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for library, handlers, propagate in self._saved:
            library.handlers, library.propagate = handlers, propagate
        root = logging.getLogger()
        for handler in (self._file, self._terminal):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(self._saved_root_level)

    def route_ray_processes(self) -> None:
        """Write what Ray forwards from its processes (every worker's and actor's stdout and
        stderr, with Ray's ``(Name pid=N)`` prefixes) into the log file, not the terminal.

        Ray prints it through the handler it registers on its stream dispatcher at
        ``ray.init``; this swaps that handler for one writing to the file, all lines, with
        no de-duplication. Call after ``ray.init``.
        """
        if self.verbose:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
        from ray._private.worker import print_worker_logs

        processes = logging.getLogger("ray.processes")
        writer = _LineWriter(processes)

        def to_log_file(data: dict[str, Any]) -> None:
            print_worker_logs(data, writer)

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.add_handler("ray_print_logs", to_log_file)


class _LineWriter(io.TextIOBase):
    """A text stream that logs each complete line it is given (from any thread)."""

    encoding = "utf-8"

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.logger.info(line)
        return len(text)

    def writable(self) -> bool:
        return True
