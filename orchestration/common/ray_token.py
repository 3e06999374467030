"""Ray's auth token for this project's command lines, found the way Ray itself looks for it.

A cluster started with token authentication (``RAY_AUTH_MODE=token``, Ray's default for
``ray start`` since 2.59) refuses clients that do not send its token. Ray's own clients send
it only when their process also has ``RAY_AUTH_MODE=token``, which a user who was handed a
token file rarely sets. So the entry points (``python -m orchestration.sweep`` and
``orchestration.jobs``) call :func:`use_a_found_token` before anything imports Ray: when
``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``, the file
``RAY_AUTH_TOKEN_PATH`` names, or Ray's default ``~/.ray/auth_token``), token mode is turned
on for this process, and Ray sends that token. It must come first: Ray reads
``RAY_AUTH_MODE`` once, when it is imported. ``RAY_AUTH_MODE=disabled`` is left alone.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
"""Where ``ray start`` and ``ray get-auth-token --generate`` keep the token."""


def found_token_source(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Where a token is (``RAY_AUTH_TOKEN``, or a file that exists and is not empty), or None."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(named)] if named else [DEFAULT_TOKEN_FILE.expanduser()]
    for path in candidates:
        try:
            if path.read_text(encoding="utf-8").strip():
                return str(path)
        except (OSError, UnicodeDecodeError):
            continue
    return None


def use_a_found_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Turn Ray's token mode on in ``environ`` when ``RAY_AUTH_MODE`` is unset and a token is
    found; returns where the token is (None: nothing changed). Call before importing Ray."""
    if environ.get("RAY_AUTH_MODE"):
        return None
    source = found_token_source(environ)
    if source is not None:
        environ["RAY_AUTH_MODE"] = "token"
    return source
