"""Which loss term pulls a trained model's center prior where: per class, the gradient of
each AutoAssign loss term with respect to the prior's ``mean`` and ``sigma``.

A plain SGD step moves a parameter by ``-lr * gradient``; the printed values are the
gradients averaged over training batches (the checkpoint's own data, resize and flips).
Where ``loss_pos`` (which rewards prior mass on the points that predict the box well) and
``loss_center`` (which rewards prior mass on every inside point) pull a mean in opposite
directions, the learned mean settles between them.

    python scripts/prior_gradients.py runs/prior_shift/trials/<trial>/checkpoints/last \\
        --batches 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoassign.data.loader import build_train_loader  # noqa: E402
from autoassign.engine.data_setup import prepare_datasets  # noqa: E402
from autoassign.predict import Predictor  # noqa: E402

TERMS = ("loss_pos", "loss_neg", "loss_center")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    predictor = Predictor(args.checkpoint, device="cpu")
    cfg, model = predictor.config, predictor.model.train()
    train_set, _ = prepare_datasets(cfg.data)
    loader = build_train_loader(
        train_set, cfg.data, cfg.model.input, seed=args.seed, rank=0, world_size=1
    )
    prior = model.head.center_prior
    prior.mean.requires_grad_(True)
    prior.sigma.requires_grad_(True)
    sums = {term: [torch.zeros_like(prior.mean), torch.zeros_like(prior.sigma)] for term in TERMS}
    seen = 0
    for batch in loader:
        if seen == args.batches:
            break
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch.targets]
        losses = model(batch.images, targets, image_sizes=batch.image_sizes)
        for term in TERMS:
            if not losses[term].requires_grad:
                continue
            mean_grad, sigma_grad = torch.autograd.grad(
                losses[term], (prior.mean, prior.sigma), retain_graph=True, allow_unused=True
            )
            for total, grad in zip(sums[term], (mean_grad, sigma_grad)):
                if grad is not None:
                    total += grad
        seen += 1

    names = train_set.class_names
    print(f"{args.checkpoint}: gradients averaged over {seen} batches of {cfg.data.batch_size}")
    print(f"{'class':>16} {'mean x, y':>16} " + " ".join(f"{t + ' d/dmean':>24}" for t in TERMS))
    for index, name in enumerate(names):
        cells = [f"{name:>16}", f"{_pair(prior.mean[index]):>16}"]
        cells += [f"{_pair(sums[t][0][index] / seen):>24}" for t in TERMS]
        print(" ".join(cells))
    print(f"{'class':>16} {'sigma x, y':>16} " + " ".join(f"{t + ' d/dsigma':>24}" for t in TERMS))
    for index, name in enumerate(names):
        cells = [f"{name:>16}", f"{_pair(prior.sigma[index]):>16}"]
        cells += [f"{_pair(sums[t][1][index] / seen):>24}" for t in TERMS]
        print(" ".join(cells))
    return 0


def _pair(values: torch.Tensor) -> str:
    x, y = (float(v) for v in values.detach())
    return f"{x:+.4f} {y:+.4f}"


if __name__ == "__main__":
    sys.exit(main())
