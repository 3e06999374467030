"""AutoAssign's learned label assignment against FCOS's fixed one, on the same data and budget.

FCOS is the project's ``model.kind: fcos`` (:mod:`autoassign.model.fcos`): torchvision's FCOS
head, assignment (center sampling, radius 1.5 strides) and losses on exactly the backbone and
FPN that the project config builds (depth, norm, width, P3-P7, the same initialisation), with
a head of the same depth and width. Both models then go through one training loop: the
project's loader (resize, flip, batching), its SGD parameter groups, warmup and step schedule
and gradient clipping. Both are scored by the project's evaluator for the dataset. What
differs is what the paper compares: the assignment and the losses (FCOS: focal loss, GIoU and
centerness; AutoAssign: its weighted positive, negative and center losses). FCOS keeps its
own head details (torchvision's initialisation, a centerness branch on the regression tower).
Inference limits are the config's (score threshold, candidates per level, NMS IoU,
detections per image).

The same comparison runs through the platform, with MLflow runs and a learning-rate grid:
``configs/baseline.yaml`` (``variants: {autoassign: {}, fcos: {model.kind: fcos}}``).

Several seeds are run, because at demo scale the gap between the two is of the order of the
seed-to-seed spread. Each seed prints the metric of both models. The end prints the mean
± sample sd of each, and of the paired difference (AutoAssign - FCOS).

    python benchmarks/assignment_vs_fcos.py configs/demo_single.yaml --seeds 0 1 2
    python benchmarks/assignment_vs_fcos.py configs/demo_single.yaml train.lr=0.01 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoassign.config import ExperimentConfig  # noqa: E402
from autoassign.config_loading import load_experiment_config  # noqa: E402
from autoassign.data.loader import (  # noqa: E402
    build_eval_loader,
    build_train_loader,
    iterations_per_epoch,
)
from autoassign.engine.data_setup import prepare_datasets, synthesize_if_missing  # noqa: E402
from autoassign.engine.optim import WarmupStepSchedule, build_optimizer, scaled_lr  # noqa: E402
from autoassign.engine.trainer import seed_everything  # noqa: E402
from autoassign.eval import build_evaluator  # noqa: E402
from autoassign.model import build_detector  # noqa: E402


def train_and_score(name: str, cfg: ExperimentConfig, datasets, seed: int) -> dict[str, float]:
    """Train ``name`` (autoassign or fcos) with seed ``seed``; the evaluator's metrics."""
    train_set, val_set = datasets
    seed_everything(seed)
    model = build_detector(cfg.model.model_copy(update={"kind": name}))
    model.train()
    data, train = cfg.data, cfg.train
    peak_lr = scaled_lr(train, data.batch_size)
    optimizer = build_optimizer(model, train, lr=peak_lr)
    per_epoch = iterations_per_epoch(train_set, data, world_size=1)
    if train.max_iters_per_epoch is not None:
        per_epoch = min(per_epoch, train.max_iters_per_epoch)
    schedule = WarmupStepSchedule.from_config(train, base_lr=peak_lr, iters_per_epoch=per_epoch)
    epochs, _ = train.resolved_schedule()
    loader = build_train_loader(train_set, data, cfg.model.input, seed=seed, rank=0, world_size=1)
    iteration, started, skipped = 0, time.perf_counter(), 0
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= per_epoch:
                break
            schedule.apply(optimizer, iteration)
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch.targets]
            losses = model(batch.images, targets, image_sizes=batch.image_sizes)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(total):
                skipped += 1  # what the engine's on_nonfinite_loss: skip would do
            else:
                total.backward()
                if train.grad_clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip_norm)
                optimizer.step()
            iteration += 1
        print(
            f"  {name} seed {seed}: epoch {epoch + 1}/{epochs}, {iteration} steps, "
            f"loss {float(total.detach()):.3f}, {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    metrics = evaluate(model, cfg, val_set)
    metrics["steps"], metrics["skipped_steps"] = iteration, skipped
    metrics["train_seconds"] = time.perf_counter() - started
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, cfg: ExperimentConfig, val_set) -> dict[str, float]:
    model.eval()
    evaluator = build_evaluator(val_set, cfg.eval)
    loader = build_eval_loader(
        val_set, cfg.model.input, batch_size=cfg.eval.batch_size, num_workers=0, rank=0,
        world_size=1,
    )  # fmt: skip
    for batch in loader:
        outputs = model(
            batch.images, image_sizes=batch.image_sizes, original_sizes=batch.original_sizes
        )
        evaluator.process(
            [
                {"file_name": val_set.records[i].file_name, **{k: v for k, v in out.items()}}
                for i, out in zip(batch.indices, outputs)
            ]
        )
    return {k: float(v) for k, v in evaluator.evaluate().items()}


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a project experiment config")
    parser.add_argument("overrides", nargs="*", help="key.path=value, as for autoassign.train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=["autoassign", "fcos"],
                        default=["autoassign", "fcos"])  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = load_experiment_config(args.config, args.overrides)
    if cfg.device not in ("cpu", "auto"):
        print("note: this benchmark runs on the CPU", file=sys.stderr)
    synthesize_if_missing(cfg.data)
    datasets = prepare_datasets(cfg.data)
    metric = build_evaluator(datasets[1], cfg.eval).primary_metric
    second = {"bbox_mAP": "bbox_mAP_50"}.get(metric)
    print(
        f"{args.config} ({', '.join(args.overrides) or 'no overrides'}): {cfg.data.format} at "
        f"{cfg.data.root}, {len(datasets[0])} train / {len(datasets[1])} val images, "
        f"{cfg.model.input.max_size} px, ResNet-{cfg.model.backbone.depth} "
        f"{cfg.model.backbone.norm}, FPN {cfg.model.fpn_channels}, head {cfg.model.head.num_convs} "
        f"convs; seeds {args.seeds}; threads {torch.get_num_threads()}"
    )
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in args.models}
    for seed in args.seeds:
        for name in args.models:
            results[name][seed] = train_and_score(name, cfg, datasets, seed)
        line = "  ".join(
            f"{name} {metric} {results[name][seed][metric]:.4f}"
            + (f" ({second} {results[name][seed][second]:.4f})" if second else "")
            for name in args.models
        )
        print(f"seed {seed}: {line}", flush=True)

    print(f"\n{metric} over seeds {args.seeds} (mean ± sample sd):")
    for name in args.models:
        values = [results[name][s][metric] for s in args.seeds]
        extra = ""
        if second:
            extra = f"; {second} {mean_sd([results[name][s][second] for s in args.seeds])}"
        print(f"  {name:>10}: {mean_sd(values)}{extra}  per seed {rounded(values)}")
    if set(args.models) == {"autoassign", "fcos"}:
        gaps = [results["autoassign"][s][metric] - results["fcos"][s][metric] for s in args.seeds]
        print(f"  difference autoassign - fcos: {mean_sd(gaps)}  per seed {rounded(gaps)}")
        if len(args.seeds) > 1:
            spread = max(
                statistics.stdev(results[name][s][metric] for s in args.seeds)
                for name in args.models
            )
            if spread > 0:
                ratio = abs(statistics.fmean(gaps)) / spread
                print(f"  |mean difference| / larger per-model sd: {ratio:.2f}")
    if args.json is not None:
        report = {"config": str(args.config), "overrides": args.overrides, "metric": metric}
        args.json.write_text(json.dumps({**report, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
