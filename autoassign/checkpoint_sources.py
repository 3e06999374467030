"""Where a checkpoint to run comes from: a local path, or a URI an installed plugin resolves.

The library reads local files only. A reference with a URI scheme, such as
``models:/autoassign-coco@best``, is handed to the function registered for that scheme in
the ``autoassign.checkpoint_resolvers`` entry-point group, which returns a local checkpoint
file. The platform's ``orchestration`` package registers ``models`` (the MLflow model
registry) in ``pyproject.toml``, so ``python -m autoassign.predict models:/...`` works without
the library importing MLflow. Another package can register its own scheme the same way::

    [project.entry-points."autoassign.checkpoint_resolvers"]
    models = "orchestration.tracking.registry:resolve_model_uri"
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

from autoassign.errors import CheckpointError

ENTRY_POINT_GROUP = "autoassign.checkpoint_resolvers"
# Two letters at least, so that a Windows drive ("C:\\runs") is not taken for a scheme.
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):")


def uri_scheme(reference: str | Path) -> str | None:
    """The URI scheme of ``reference`` (``"models"`` for ``models:/x@best``), None for a path."""
    if isinstance(reference, Path):
        return None
    match = _SCHEME.match(reference)
    return match.group("scheme").lower() if match else None


def registered_schemes() -> dict[str, object]:
    """Scheme -> entry point, for every resolver installed in this environment."""
    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_checkpoint(reference: str | Path) -> Path:
    """A local checkpoint (directory or ``checkpoint.pt``) for a path or a resolvable URI.

    Raises:
        CheckpointError: a URI whose scheme no installed package resolves, or a resolver
            that could not find what the URI names (its own message).
    """
    scheme = uri_scheme(reference)
    if scheme is None or Path(reference).exists():
        return Path(reference)
    resolvers = registered_schemes()
    if scheme not in resolvers:
        known = ", ".join(f"{name}:" for name in sorted(resolvers)) or "none installed"
        raise CheckpointError(
            f"{reference}: no checkpoint resolver for the scheme {scheme!r} "
            f"(resolvers: {known}); give a checkpoint path instead"
        )
    resolve = resolvers[scheme].load()
    return Path(resolve(str(reference)))
