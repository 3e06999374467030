"""Test-session order: the fast unit tests first, the integration tests (real Ray, MLflow and
S3 servers, which stay up until the session ends and share the two CPU cores) last."""

from __future__ import annotations


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: "tests/integration/" in item.nodeid.replace("\\", "/"))
