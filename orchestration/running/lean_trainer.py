"""A Ray Train ``TorchTrainer`` without the helper actors a trial here cannot use.

Ray Train (2.60) gives every run two helpers that are each an actor, that is a Python process
of its own started once per trial, whose CPU a small machine takes from the training beside
it:

- ``DatasetsCallback`` starts a ``DatasetManager`` (importing Ray Data) when the workers
  start, whether or not the trainer was given any Ray Datasets. The trials here read their
  images with the library's own loaders and never pass ``datasets=``.
- ``PlacementGroupCleanerCallback`` starts a ``PlacementGroupCleaner`` that asks the
  dashboard's State API once a second whether the Train controller is still alive, to remove
  the workers' placement group if it died. On a Ray started without its dashboard (the
  sweep's embedded local Ray) every one of those queries fails, so it only logs "Failed to
  query Ray Train Controller actor state" once a second and never cleans anything; there the
  whole Ray ends with the sweep, and ``orchestration.running.termination`` releases the
  sweep's groups on SIGTERM.

:func:`torch_trainer_class` leaves out the first when there are no datasets and the second
when asked to (``SweepContext.placement_group_cleaner``), and is a plain ``TorchTrainer``
otherwise. The workers' train context takes no shard provider then
(``ray.train.get_dataset_shard`` would have nothing to give anyway).

``_create_default_callbacks`` is Ray Train's own seam for its built-in callbacks, not a
public API: if a Ray version moves it, :func:`torch_trainer_class` falls back to the plain
trainer, which only costs the extra processes again.
"""

from __future__ import annotations

from typing import Any


def torch_trainer_class(*, placement_group_cleaner: bool = True) -> type:
    """A ``TorchTrainer`` subclass without the Ray Data helper when it is given no datasets,
    and without the placement-group cleaner unless ``placement_group_cleaner``; the plain
    ``ray.train.torch.TorchTrainer`` where this Ray lacks the seam it relies on."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return TorchTrainer
    if not callable(getattr(TorchTrainer, "_create_default_callbacks", None)):
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        """``TorchTrainer`` without the helper actors this run cannot use."""

        def _create_default_callbacks(self) -> list[Any]:
            unused: tuple[type, ...] = ()
            if not getattr(self, "datasets", None):
                unused += (DatasetsCallback,)
            if not placement_group_cleaner:
                unused += (PlacementGroupCleanerCallback,)
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, unused)]

    return LeanTorchTrainer
