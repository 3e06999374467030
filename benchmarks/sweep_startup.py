"""Seconds from launch to the first training step: a sweep against a bare TorchTrainer.

    python benchmarks/sweep_startup.py [--rounds 2]

Both are started as fresh processes that start their own local Ray, on the same machine, in
the same run, alternating:

- peer: ``ray.init()`` + a ``TorchTrainer`` with one worker whose loop builds a small conv
  net and takes one optimizer step (the least a Ray Train job does before training);
- ours: ``python -m orchestration.sweep`` on a one-trial sweep (synthetic COCO set already
  written, MLflow in SQLite), timed to the first line rank 0 appends to ``metrics.jsonl``
  (written right after the first optimizer step, ``log_every_iters: 1``).

It prints both times, the difference (goal: at most 10 s more) and the ratio. What the sweep
adds: config checks and the dataset scan, MLflow parent and child runs, Tune's controller
and trial driver, the engine's setup (datasets, model, loaders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PEER = r"""
import time, sys
import ray, ray.train
from ray.train.torch import TorchTrainer

def loop(config):
    import torch
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3)
    )
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(torch.randn(2, 3, 128, 128)).square().mean()
    loss.backward()
    optimizer.step()
    print(f"FIRST_STEP {time.time():.3f}", flush=True)

ray.init(include_dashboard=False)
TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1)).fit()
"""


def sweep_config(folder: Path) -> Path:
    from autoassign.data.synthetic import write_synthetic

    root = folder / "data" / "coco"
    if not root.exists():
        write_synthetic("coco", root, num_images=16, image_size=128, num_classes=2)
    config = {
        "name": "startup",
        "base": {
            "model": {
                "backbone": {"depth": 18, "style": "pytorch", "norm": "gn", "frozen_stages": -1},
                "fpn_channels": 64,
                "head": {"num_convs": 1},
                "input": {"min_size": 128, "max_size": 128},
            },
            "data": {"batch_size": 2, "num_workers": 0},
            "train": {
                "schedule": None,
                "epochs": 1,
                "milestones": [1],
                "log_every_iters": 1,
                "max_iters_per_epoch": 2,
            },
            "device": "cpu",
        },
        "datasets": [
            {"name": "coco", "format": "coco", "root": str(root), "num_classes": 2},
        ],
    }
    path = folder / "startup.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def time_peer(folder: Path) -> float:
    script = folder / "peer.py"
    script.write_text(PEER, encoding="utf-8")
    start = time.time()
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    first = None
    for line in process.stdout:
        if "FIRST_STEP" in line:
            first = float(line.split("FIRST_STEP")[1].split()[0])
    process.wait()
    if first is None:
        raise RuntimeError("the bare TorchTrainer never reported its first step")
    return first - start


def time_sweep(folder: Path, config: Path, round_index: int) -> float:
    output = folder / f"sweep_{round_index}"
    start = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.sweep", str(config), f"output_dir={output}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=folder,
    )
    first = None
    while first is None and process.poll() is None:
        for path in output.glob("trials/*/metrics.jsonl"):
            lines = path.read_text(encoding="utf-8").splitlines()
            if any(json.loads(line).get("type") == "train" for line in lines):
                first = path.stat().st_mtime
        time.sleep(0.05)
    process.wait()
    if first is None:
        raise RuntimeError(f"the sweep ended (exit {process.returncode}) before a first step")
    return first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = sweep_config(folder)
        peers, sweeps = [], []
        for index in range(args.rounds):
            peers.append(time_peer(folder))
            sweeps.append(time_sweep(folder, config, index))
            print(
                f"round {index + 1}: bare TorchTrainer {peers[-1]:.1f} s, sweep {sweeps[-1]:.1f} s"
            )
    peer, ours = statistics.median(peers), statistics.median(sweeps)
    print(f"launch to first training step (median of {args.rounds}):")
    print(f"  bare TorchTrainer: {peer:.1f} s")
    print(f"  orchestration.sweep: {ours:.1f} s")
    print(f"  difference: {ours - peer:+.1f} s (goal: at most +10 s), ratio {ours / peer:.2f}")


if __name__ == "__main__":
    main()
