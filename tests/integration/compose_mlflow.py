"""How the compose stack runs ``mlflow server``, read from ``docker-compose.yml`` itself, so
that the tests' server (``conftest.py``) and the benchmarks' (``benchmarks/sweep_scale.py``)
run as the stack's does."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


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
    """The compose file's settings of how ``mlflow server`` runs that hold no address or
    secret (``MLFLOW_SERVER_*``), for the tests' server to run as the stack's does."""
    service = compose_mlflow_service()
    return {
        name: str(value)
        for name, value in service["environment"].items()
        if name.startswith("MLFLOW_SERVER_") and "${" not in str(value)
    }
