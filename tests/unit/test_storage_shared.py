"""Storage on a cluster of several nodes: a local folder is refused unless every node mounts
it (``storage.shared``); S3 and a one-node Ray are always fine. The check against a live
cluster of three nodes is ``tests/integration/test_multi_node.py``'s."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestration.definition.sweep_config import ResourcesConfig, StorageConfig
from orchestration.running.storage import storage_problem


@pytest.mark.parametrize("nodes", [0, 1])
def test_one_node_takes_any_folder(nodes):
    assert storage_problem("/runs/demo/ray", shared=False, configured=False, nodes=nodes) is None


@pytest.mark.parametrize("nodes", [2, 5])
def test_s3_reaches_every_node(nodes):
    assert storage_problem("s3://bucket/sweeps", shared=False, configured=True, nodes=nodes) is None


def test_a_shared_folder_is_taken_on_a_cluster():
    assert storage_problem("/mnt/nfs/sweeps", shared=True, configured=True, nodes=3) is None


def test_a_local_folder_on_a_cluster_is_refused_naming_the_field_and_the_fixes():
    problem = storage_problem("/data/sweeps", shared=False, configured=True, nodes=3)
    assert problem is not None
    assert problem.startswith("storage.path /data/sweeps is a local folder")
    assert "the cluster has 3 nodes" in problem
    assert "storage.path: s3://" in problem
    assert "storage.shared: true if /data/sweeps is on a filesystem every node mounts" in problem


def test_the_default_folder_is_named_as_the_default():
    problem = storage_problem(
        "/home/user/project/runs/demo/ray", shared=False, configured=False, nodes=2
    )
    assert problem is not None
    assert problem.startswith(
        "storage.path is not set, so checkpoints would go to /home/user/project/runs"
    )
    assert "the cluster has 2 nodes" in problem


def test_a_folder_whose_name_merely_contains_s3_is_local():
    assert storage_problem("/data/s3://x", shared=False, configured=True, nodes=2) is not None


def test_shared_is_off_unless_asked_for():
    assert StorageConfig().shared is False
    assert StorageConfig.model_validate({"path": "/mnt/nfs", "shared": True}).shared is True
    with pytest.raises(ValidationError):
        StorageConfig.model_validate({"shared": "maybe"})


def test_placement_strategy_is_one_of_ray_trains():
    assert ResourcesConfig().placement_strategy == "PACK"
    assert ResourcesConfig(placement_strategy="SPREAD").placement_strategy == "SPREAD"
    with pytest.raises(ValidationError):
        ResourcesConfig(placement_strategy="spread-ish")
