"""Secrets kept out of what a sweep shows and records: printed lines, logs, MLflow artifacts.

A secret reaches a sweep in two shapes: inside a URI (``postgresql://user:pw@db/mlflow``,
``http://user:token@mlflow:5000``, a pre-signed ``?X-Amz-Signature=...`` query) or as the
value of a field whose name says it is one (``password``, ``secret_key``, ``token``). Both are
replaced by ``***``; everything else is shown as it is, so a redacted config still says which
server and bucket a sweep used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse, urlunparse

HIDDEN = "***"
SECRET_NAME = re.compile(
    r"(secret|password|passwd|pwd|token|credential|access_key|signature|api_key|auth)",
    re.IGNORECASE,
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact(uri: str | None) -> str | None:
    """``uri`` without its ``user:password@`` part and without its query string (which can
    carry tokens and signatures); anything that is not a URI is returned as it is."""
    if not uri or not _URI.match(uri):
        return uri
    parsed = urlparse(uri)
    if "@" not in parsed.netloc and not parsed.query:
        return uri  # rebuilt, "sqlite:////abs/path" would lose a slash
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    return urlunparse(parsed._replace(netloc=netloc, query=""))


def redact_data(data: Any) -> Any:
    """A copy of ``data`` (a config as plain dicts, lists and scalars) with each URI
    redacted and the value of each secret-named key hidden."""
    if isinstance(data, Mapping):
        return {
            key: HIDDEN
            if SECRET_NAME.search(str(key)) and data[key] is not None
            else redact_data(data[key])
            for key in data
        }
    if isinstance(data, (list, tuple)):
        return [redact_data(item) for item in data]
    if isinstance(data, str):
        return redact(data)
    return data
