"""``benchmarks/process_cpu.py``: the CPU of real processes, by kind, read from ``/proc``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from process_cpu import ProcessCpu, kind_of, telling  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only")

BURN = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"


def test_a_process_started_in_the_block_counts_its_cpu_under_its_kind(tmp_path):
    script = tmp_path / "burner.py"
    script.write_text(BURN)
    with ProcessCpu(interval=0.05) as cpu:
        subprocess.run([sys.executable, str(script)], check=True)
    use = cpu.by_kind()["burner.py"]
    assert use.processes == 1
    assert 0.4 <= use.seconds <= 1.0  # its 0.6 s, less what fell between the last reads


def test_processes_are_named_as_a_person_reads_a_sweep():
    assert kind_of(["ray::TrainController.run"]) == "ray::TrainController"
    assert kind_of(["ray::RayTrainWorker"]) == "ray::RayTrainWorker"
    assert kind_of(["/usr/bin/python3", "-u", "-m", "autoassign.train", "c.yaml"]) == (
        "-m autoassign.train"
    )
    assert kind_of(["/opt/ray/core/src/ray/gcs/gcs_server", "--port=1"]) == "gcs_server"
    assert kind_of([]) == ""


def test_a_ray_workers_actor_title_wins_over_its_earlier_names():
    names = ["default_worker.py", "ray::IDLE", "ray::TrainController", "", "default_worker.py"]
    best = ""
    for name in names:
        best = name if telling(name) > telling(best) else best
    assert best == "ray::TrainController"
