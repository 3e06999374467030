"""How the AutoAssign loss scales with the number of boxes in an image.

One 1333x800 image padded to 1344x800 (levels 100x168, 50x84, 25x42, 13x21, 7x11), C=80,
random head outputs that require grad, and 1 to 3000 boxes of realistic sizes (log-uniform
sides, some crowds of tiny boxes). For each box count it times forward + backward of the
sparse loss (median of ``--repeats``) and measures its peak extra memory; the dense per-image
reference (``tests/loss_reference.py``) is measured the same way as the peer for the
smaller counts.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call; on
CPU the resident-set high-water mark (``VmHWM``) of a fresh subprocess per case, reset with
``/proc/self/clear_refs`` just before the call, minus the resident set at that moment.

    python benchmarks/loss_scaling.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

STRIDES = [8, 16, 32, 64, 128]
HEIGHT, WIDTH = 800, 1344
NUM_CLASSES = 80
BOX_COUNTS = [1, 10, 100, 1000, 3000]


def make_inputs(num_boxes: int, device: str, seed: int = 0):
    """Random head outputs (leaf tensors) and ``num_boxes`` boxes for one image."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(math.ceil(HEIGHT / s), math.ceil(WIDTH / s)) for s in STRIDES]
    cls = [torch.randn(1, NUM_CLASSES, h, w, generator=gen) - 4.0 for h, w in sizes]
    obj = [torch.randn(1, 1, h, w, generator=gen) for h, w in sizes]
    # relu(scale * reg) * stride with reg around its initial bias of 4 (in strides): 0..8 strides.
    reg = [
        torch.relu(torch.randn(1, 4, h, w, generator=gen) * 2 + 4) * s
        for (h, w), s in zip(sizes, STRIDES)
    ]
    num_crowd = num_boxes // 5
    num_regular = num_boxes - num_crowd
    side = torch.exp(
        torch.empty(num_regular, 1).uniform_(math.log(12), math.log(600), generator=gen)
    )
    aspect = torch.exp(torch.empty(num_regular, 1).uniform_(-0.7, 0.7, generator=gen))
    wh = torch.cat((side * aspect.sqrt(), side / aspect.sqrt()), 1)
    centre = torch.rand(num_regular, 2, generator=gen) * torch.tensor([WIDTH, HEIGHT])
    regular = torch.cat((centre - wh / 2, centre + wh / 2), 1)
    # Crowds: a few clusters of 3..20 pixel boxes (faces in a stadium, people far away).
    crowd_centres = torch.rand(max(1, num_crowd // 100), 2, generator=gen) * torch.tensor(
        [WIDTH, HEIGHT]
    )
    which = torch.randint(0, crowd_centres.shape[0], (num_crowd,), generator=gen)
    centre = crowd_centres[which] + torch.randn(num_crowd, 2, generator=gen) * 60
    wh = torch.empty(num_crowd, 2).uniform_(3, 20, generator=gen)
    crowd = torch.cat((centre - wh / 2, centre + wh / 2), 1)
    boxes = torch.cat((regular, crowd))
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, WIDTH - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, HEIGHT - 1)
    labels = torch.randint(0, NUM_CLASSES, (num_boxes,), generator=gen)
    leaves = [x.to(device).requires_grad_() for x in (*cls, *reg, *obj)]
    n = len(STRIDES)
    return leaves[:n], leaves[n : 2 * n], leaves[2 * n :], [boxes.to(device)], [labels.to(device)]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(impl: str, num_boxes: int, device: str, repeats: int) -> dict:
    """Time and measure one (implementation, box count) case in this process."""
    from autoassign.model.center_prior import CenterPrior
    from autoassign.model.loss import autoassign_loss

    # The dense reference is a test oracle, not part of the package: import it from tests/.
    sys.path.insert(0, str(REPO))
    from tests.loss_reference import dense_autoassign_loss

    loss_fn = autoassign_loss if impl == "sparse" else dense_autoassign_loss
    cls, reg, obj, boxes, labels = make_inputs(num_boxes, device)
    prior = CenterPrior(NUM_CLASSES).to(device)
    inputs = [*cls, *reg, *obj, prior.mean, prior.sigma]

    def step():
        losses = loss_fn(cls, reg, obj, STRIDES, boxes, labels, prior)
        total = losses["loss_pos"] + losses["loss_neg"] + losses["loss_center"]
        torch.autograd.grad(total, inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        step()  # warm-up: kernels, allocator
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        step()
        peak_mb = (_rss_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "boxes": num_boxes, "ms": 1000 * statistics.median(times), "mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    parser.add_argument(
        "--dense-max", type=int, default=100, help="largest box count to run the dense peer on"
    )
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "BOXES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("loss_scaling: --device cuda but torch sees no CUDA device")

    if args.case:  # one measurement, in a fresh process
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.device, args.repeats)))
        return

    results: dict[tuple[str, int], dict] = {}
    cases = [("sparse", n) for n in BOX_COUNTS]
    cases += [("dense", n) for n in BOX_COUNTS if n <= args.dense_max]
    for impl, n in cases:
        command = [sys.executable, __file__, "--case", impl, str(n)]
        command += ["--device", args.device, "--repeats", str(args.repeats)]
        command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{impl} {n} boxes failed:\n{done.stderr}", file=sys.stderr)
            continue
        results[impl, n] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  measured {impl:6s} {n:5d} boxes", file=sys.stderr)

    base = results.get(("sparse", 100))
    print(f"device={args.device} threads={args.threads} repeats={args.repeats} C={NUM_CLASSES}")
    print(
        f"image {WIDTH}x{HEIGHT}, levels "
        + ", ".join(f"{math.ceil(HEIGHT / s)}x{math.ceil(WIDTH / s)}" for s in STRIDES)
    )
    header = (
        f"{'boxes':>6} {'time ms':>9} {'peak MB':>9} {'x 100-box':>10} "
        f"{'dense ms':>9} {'dense MB':>9} {'dense/sparse':>13}"
    )
    print(header)
    for n in BOX_COUNTS:
        sparse = results.get(("sparse", n))
        dense = results.get(("dense", n))
        if sparse is None:
            continue
        scale = f"{sparse['ms'] / base['ms']:.2f}" if base else "-"
        dense_ms = f"{dense['ms']:.1f}" if dense else "-"
        dense_mb = f"{dense['mb']:.1f}" if dense else "-"
        ratio = f"{dense['ms'] / sparse['ms']:.2f}" if dense else "-"
        print(
            f"{n:>6} {sparse['ms']:>9.1f} {sparse['mb']:>9.1f} {scale:>10} "
            f"{dense_ms:>9} {dense_mb:>9} {ratio:>13}"
        )


if __name__ == "__main__":
    main()
