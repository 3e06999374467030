"""The trials' Ray Train trainer starts no helper actor it cannot use
(orchestration.running.lean_trainer): no Ray Data helper without datasets, no placement-group
cleaner on a Ray without a dashboard. The sweeps in tests/integration run their trials with it
(the local-Ray sweeps without the cleaner, the cluster sweeps with it)."""

from __future__ import annotations

import ray.train
from ray.train.torch import TorchTrainer

from orchestration.running.lean_trainer import torch_trainer_class

SCALING = ray.train.ScalingConfig(num_workers=1)


def callback_names(trainer) -> list[str]:
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


def not_called_before_fit():  # Ray Train calls a dataset given as a function at worker start
    raise AssertionError("called before fit")


def test_without_datasets_only_the_datasets_callback_is_left_out():
    plain = callback_names(TorchTrainer(lambda: None, scaling_config=SCALING))
    lean_class = torch_trainer_class()
    assert issubclass(lean_class, TorchTrainer) and lean_class is not TorchTrainer
    lean = callback_names(lean_class(lambda: None, scaling_config=SCALING))
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= set(plain)  # this Ray's
    assert lean == [name for name in plain if name != "DatasetsCallback"]


def test_with_datasets_it_keeps_the_datasets_callback():
    datasets = {"train": not_called_before_fit}
    lean = torch_trainer_class()(lambda: None, scaling_config=SCALING, datasets=datasets)
    plain = TorchTrainer(lambda: None, scaling_config=SCALING, datasets=datasets)
    assert callback_names(lean) == callback_names(plain)


def test_the_placement_group_cleaner_is_left_out_when_asked():
    plain = callback_names(TorchTrainer(lambda: None, scaling_config=SCALING))
    trainer = torch_trainer_class(placement_group_cleaner=False)
    lean = callback_names(trainer(lambda: None, scaling_config=SCALING))
    unused = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert lean == [name for name in plain if name not in unused]
