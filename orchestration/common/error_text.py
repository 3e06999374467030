"""The one line of an error that says what went wrong, for messages and run tags."""

from __future__ import annotations

import re

_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::[ \t]?(?P<message>.*))?$")


def ray_error_reason(error: BaseException) -> str:
    """The line of a Ray error that says what went wrong.

    Ray quotes a remote Python traceback in its errors' messages: the Jobs API's answer to a
    failed request ("Request failed with status code 500: Traceback (most recent call last):
    ..."), a ``TuneError`` around a trial's or a callback's exception. The last exception
    line's message is returned. Other errors are one line, returned as they are.
    """
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = [line.rstrip() for line in text.splitlines() if line.strip(" .")]
    if "Traceback (most recent call last)" in text:
        for line in reversed(lines):
            match = _EXCEPTION_LINE.match(line)
            if match:
                return (match["message"] or match["type"]).strip()
    # Ray's client ends the body it quotes with a "." of its own: "...: Job x does not exist.."
    first = lines[0]
    return first[:-1] if first.endswith("..") else first


def first_line(error: BaseException, limit: int = 2000) -> str:
    """The first line of ``error``'s message (its type's name when it has none), at most
    ``limit`` characters: what a run's failure reason and a warning show."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]
