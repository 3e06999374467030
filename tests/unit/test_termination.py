"""Which placement groups a stopped sweep hands back: those of its own Ray job only."""

from __future__ import annotations

from ray._raylet import JobID, PlacementGroupID

from orchestration.running.termination import created_by_job


def test_a_placement_group_is_recognised_by_the_job_that_created_it():
    job, other = JobID.from_int(4), JobID.from_int(0x104)
    group = PlacementGroupID.of(job).hex()
    assert created_by_job(group, job.hex())
    assert not created_by_job(group, other.hex())
    assert not created_by_job(PlacementGroupID.of(other).hex(), job.hex())
    assert not created_by_job(job.hex(), job.hex())  # a job id is no placement group id
