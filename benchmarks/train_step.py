"""One training step of AutoAssign R-50-FPN against torchvision's FCOS R-50-FPN.

Both models are randomly initialised (no downloads) and train on the same batch: the same
pre-resized images, the same boxes, the same threads, SGD with momentum. Runs alternate
between the two models; the printed ratio is the median of AutoAssign's step time over
FCOS's step time in the same round (target: <= 1.0).

FCOS is put in the configuration it trains in with ImageNet weights, the one AutoAssign uses
too: frozen BatchNorm everywhere and a frozen stem and stage 1 (``fcos_resnet50_fpn`` with
``weights_backbone=None`` would otherwise train every BatchNorm and every stage; pass
``--fcos-backbone trainable`` for that). FCOS's own resize is bypassed so both models see
exactly the same pixels; both normalise the input themselves.

    python benchmarks/train_step.py --device cpu --batch 2 --size 640x480 --repeats 3
    python benchmarks/train_step.py --device cuda --batch 8 --size 1333x800 --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoassign.config import ModelConfig  # noqa: E402
from autoassign.model import build_detector  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default=None, help="WxH; default 640x480 (cpu), 1333x800 (cuda)")
    parser.add_argument("--boxes", type=int, default=8, help="boxes per image")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--fcos-backbone", choices=["frozen", "trainable"], default="frozen")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = "1333x800" if args.device == "cuda" else "640x480"
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.width, args.height = width, height
    return args


def make_batch(args, generator: torch.Generator):
    """``batch`` images ``[3, H, W]`` (float, 0..255) and targets with ``boxes`` boxes each."""
    images, targets = [], []
    for _ in range(args.batch):
        image = torch.randint(0, 256, (3, args.height, args.width), generator=generator)
        xy = torch.rand(args.boxes, 2, generator=generator) * torch.tensor(
            [args.width * 0.8, args.height * 0.8]
        )
        wh = (torch.rand(args.boxes, 2, generator=generator) * 0.5 + 0.05) * torch.tensor(
            [args.width, args.height]
        )
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([args.width, args.height]))], 1)
        labels = torch.randint(0, args.num_classes, (args.boxes,), generator=generator)
        images.append(image.float())
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def freeze_like_pretrained(fcos: nn.Module) -> None:
    """Frozen BatchNorm everywhere in the backbone, stem and stage 1 not trained: what
    ``fcos_resnet50_fpn`` does when it starts from ImageNet weights."""
    body = fcos.backbone.body
    for module in list(body.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(module, child_name, frozen)
    for name, parameter in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            parameter.requires_grad_(False)


def build_models(args, device):
    autoassign = build_detector(ModelConfig(num_classes=args.num_classes))
    fcos = fcos_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=args.num_classes,
        min_size=min(args.height, args.width),
        max_size=max(args.height, args.width),
    )
    if args.fcos_backbone == "frozen":
        freeze_like_pretrained(fcos)
    # The images are already at their training size: skip FCOS's resize altogether.
    fcos.transform.resize = types.MethodType(
        lambda self, image, target=None: (image, target), fcos.transform
    )
    models = {"autoassign": autoassign, "fcos": fcos}
    for model in models.values():
        model.to(device).train()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
    return models


def make_step(name, model, images, targets, args, device):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    if name == "fcos":  # torchvision detection models take 0..1 images
        images = [image / 255.0 for image in images]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = model(images, targets)
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    return step


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = step()  # float() of the losses already waits for the device
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, losses


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images, targets = make_batch(args, torch.Generator().manual_seed(args.seed))
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    models = build_models(args, device)
    steps = {name: make_step(name, m, images, targets, args, device) for name, m in models.items()}

    print(
        f"device={args.device} batch={args.batch} size={args.width}x{args.height} "
        f"boxes/img={args.boxes} classes={args.num_classes} amp={args.amp} "
        f"channels_last={args.channels_last} threads={torch.get_num_threads()} "
        f"fcos_backbone={args.fcos_backbone}"
    )
    for _ in range(args.warmup):
        for step in steps.values():
            step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    # A step's own memory: the peak during the step minus what was allocated just before it
    # (both models' weights and optimizer states, the batch, the other model's gradients),
    # so each model is measured as if it were alone on the device.
    peak_memory: dict[str, int] = dict.fromkeys(steps, 0)
    last_losses: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():  # alternate the two models
            if device.type == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds, last_losses[name] = timed(step, device)
            times[name].append(seconds)
            if device.type == "cuda":
                step_peak = torch.cuda.max_memory_allocated(device) - before
                peak_memory[name] = max(peak_memory[name], step_peak)

    ratios = [a / f for a, f in zip(times["autoassign"], times["fcos"])]
    for name in steps:
        median = statistics.median(times[name])
        line = f"{name:>10}: median step {median * 1000:8.1f} ms  {args.batch / median:7.2f} img/s"
        if device.type == "cuda":
            line += f"  step peak memory {peak_memory[name] / 2**30:6.2f} GiB"
        losses = ", ".join(f"{k}={v:.4g}" for k, v in last_losses[name].items())
        print(f"{line}  last losses: {losses}")
    print(f"step-time ratio autoassign/fcos per round: {[round(r, 3) for r in ratios]}")
    print(f"median ratio autoassign/fcos: {statistics.median(ratios):.3f} (target <= 1.0)")
    images_per_second = {name: args.batch / statistics.median(times[name]) for name in steps}
    summary = (
        f"train_step: batch {args.batch} amp {args.amp} channels_last {args.channels_last}, "
        f"img/s ratio {images_per_second['autoassign'] / images_per_second['fcos']:.2f}"
    )
    if device.type == "cuda":
        summary += f", peak memory ratio {peak_memory['autoassign'] / peak_memory['fcos']:.2f}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
