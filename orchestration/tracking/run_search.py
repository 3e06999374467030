"""Reading many runs from MLflow: every page of a search, and a big search split into parts
that a tracking server answers at once.

MLflow's search cannot leave out a run's params, tags or metrics, so reading a sweep's
thousand trial runs is seconds of the server's work. A server answers several searches in
parallel (on PostgreSQL here, 1,000 runs of 70 params: 3.3 s in one search, 2.1 s in four at
once); a SQLite file is read in the asking process, where searches at once would only take
turns, so :func:`search_parts` gives it one.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

SEARCH_PAGE_SIZE = 1000
"""Runs per ``search_runs`` page; :func:`search_all` reads every page."""
SERVER_SEARCH_PARTS = 4
"""How many searches a big read sends a tracking server at once."""


def search_parts(tracking_uri: str) -> int:
    """How many parts a big search of ``tracking_uri`` is split into: several for a tracking
    server (``http(s)://``), one for a store read in this process."""
    return SERVER_SEARCH_PARTS if tracking_uri.startswith(("http://", "https://")) else 1


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (reference counting goes on).

    A search of 1,000 runs builds about 90,000 objects (an ORM row, then an entity, per
    param, tag and metric). Every 700 new objects make the collector scan the youngest ones,
    every tenth such scan the middle generation too, and every hundredth all objects, the
    new runs included, again and again while they pile up. With it off while the runs are
    read, ``compare`` on a 1,000-run SQLite store took 3.6-3.7 s instead of 5.1-5.8 s.
    Re-enabled after, unless it was off already (another read, in another thread, may still
    run; it then only misses the saving).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every run of the experiment matching ``filter_string`` (all pages), newest first."""
    runs: list[Any] = []
    token = None
    with cyclic_gc_paused():
        while True:  # every page: a sweep of more than one page of trials is not cut short
            page = client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                max_results=SEARCH_PAGE_SIZE,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                return runs


def search_runs_in_parts(
    client: Any, experiment_id: str, filter_string: str, parts: int = 1
) -> list[Any]:
    """Every run matching ``filter_string``; with ``parts`` > 1, read as that many searches at
    once, each over a range of the runs' start times (two small searches find the range).

    The runs come part by part (oldest range first), each part newest first; with one part,
    newest first, as :func:`search_all` returns them.
    """
    with cyclic_gc_paused():  # once for all the parts' threads (see cyclic_gc_paused)
        return _search_in_parts(client, experiment_id, filter_string, parts)


def _search_in_parts(client: Any, experiment_id: str, filter_string: str, parts: int) -> list[Any]:
    if parts <= 1:
        return search_all(client, experiment_id, filter_string)
    edges = []
    for order in ("ASC", "DESC"):
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1,
            order_by=[f"attributes.start_time {order}"],
        )  # fmt: skip
        edges += [run.info.start_time for run in page]
    if len(edges) < 2 or None in edges:  # no run, or one without a start time
        return search_all(client, experiment_id, filter_string)
    first, last = edges[0], edges[1] + 1
    bounds = [first + (last - first) * i // parts for i in range(parts)] + [last]
    ranges = [
        f"{filter_string} and attributes.start_time >= {low} and attributes.start_time < {high}"
        for low, high in zip(bounds, bounds[1:], strict=False)
        if high > low
    ]
    with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        found = pool.map(lambda part: search_all(client, experiment_id, part), ranges)
        return [run for runs in found for run in runs]
