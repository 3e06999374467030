"""How the compose stack runs ``mlflow server``, read from ``docker-compose.yml`` itself, so
that the tests' server (``conftest.py``) and the benchmarks' (``benchmarks/sweep_scale.py``)
run as the stack's does."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
SERVING_SETTING = re.compile(r"MLFLOW_SERVER_\w+|MLFLOW_UVICORN_OPTS")
"""The environment variables by which the compose file sets how ``mlflow server`` serves."""
DEFAULTED = re.compile(r"\$\{\w+:-([^}]*)\}")
"""A compose value ``${NAME:-default}``: its default is the one group."""


def compose_mlflow_service() -> dict:
    """The compose file's ``mlflow`` service, as written there."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]["mlflow"]


def compose_mlflow_flags() -> dict[str, str]:
    """``--backend-store-uri`` and ``--artifacts-destination`` of the compose file's mlflow
    service, as written there (with ``${...}`` placeholders). The store URI holds the
    database password, so the compose file gives it as MLFLOW_BACKEND_STORE_URI, the
    variable ``mlflow server`` reads for that flag."""
    service = compose_mlflow_service()
    command = service["command"]
    return {
        "--backend-store-uri": service["environment"]["MLFLOW_BACKEND_STORE_URI"],
        "--artifacts-destination": command[command.index("--artifacts-destination") + 1],
    }


def compose_mlflow_settings() -> dict[str, str]:
    """The compose file's settings of how ``mlflow server`` serves (``MLFLOW_SERVER_*``,
    ``MLFLOW_UVICORN_OPTS``), for the tests' server to run as the stack's does: a literal
    value as written, a ``${NAME:-default}`` as its default (a stack whose ``.env`` leaves it
    out); any other placeholder (a secret that must be set) is left out."""
    service = compose_mlflow_service()
    settings = {}
    for name, value in service["environment"].items():
        if not SERVING_SETTING.fullmatch(name):
            continue
        text = str(value)
        defaulted = DEFAULTED.fullmatch(text)
        if defaulted is not None:
            text = defaulted.group(1)
        if "${" not in text:
            settings[name] = text
    return settings
