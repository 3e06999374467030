"""Pictures of what a detector learned: the per-class center priors, precision-recall curves,
and boxes on images."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch import nn  # noqa: E402


def center_prior_values(model: nn.Module, class_names: Sequence[str]) -> list[dict]:
    """Per class: ``{"class", "mean": [x, y], "sigma": [x, y]}`` in units of the level stride.

    A positive mean x (y) means the prior peaks right of (below) the box centre.
    """
    prior = _unwrap(model).head.center_prior
    means = prior.mean.detach().float().cpu().numpy()
    sigmas = prior.sigma.detach().float().cpu().numpy()
    return [
        {"class": name, "mean": means[i].tolist(), "sigma": sigmas[i].tolist()}
        for i, name in enumerate(class_names)
    ]


def plot_center_priors(values: Sequence[dict], path: str | Path) -> Path:
    """Plot each class's prior: its mean as a point, one sigma as an ellipse around it.

    Axes are offsets from the box centre in strides, y pointing down as in images.
    """
    path = Path(path)
    colors = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6, 6))
    extent = 1.0
    for i, item in enumerate(values):
        (mx, my), (sx, sy) = item["mean"], item["sigma"]
        color = colors(i % colors.N)
        ax.add_patch(
            Ellipse((mx, my), 2 * abs(sx), 2 * abs(sy), fill=False, color=color, alpha=0.7)
        )
        ax.plot([mx], [my], "o", color=color, label=item["class"])
        extent = max(extent, abs(mx) + abs(sx), abs(my) + abs(sy))
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlim(-1.1 * extent, 1.1 * extent)
    ax.set_ylim(1.1 * extent, -1.1 * extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x offset from box centre (strides)")
    ax.set_ylabel("y offset from box centre (strides)")
    ax.set_title("Learned center priors (mean, 1 sigma)")
    if len(values) <= 20:
        ax.legend(loc="upper right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_center_prior_report(
    model: nn.Module, class_names: Sequence[str], output_dir: str | Path
) -> tuple[Path, Path]:
    """Write ``center_prior.png`` and ``center_prior.json`` to ``output_dir``."""
    output_dir = Path(output_dir)
    values = center_prior_values(model, class_names)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "center_prior.json"
    json_path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return plot_center_priors(values, output_dir / "center_prior.png"), json_path


def draw_detections(
    image: Image.Image,
    boxes: np.ndarray,
    labels: Sequence[int],
    scores: np.ndarray,
    class_names: Sequence[str],
) -> Image.Image:
    """A copy of ``image`` with each ``[x1, y1, x2, y2]`` box (pixels) outlined and captioned
    with its class name and score; one colour per class index."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    palette = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for box, label, score in zip(boxes, labels, scores):
        rgb = palette(int(label) % palette.N)[:3]
        color = tuple(int(255 * c) for c in rgb)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{class_names[int(label)]} {score:.2f}", fill=color)
    return canvas


def draw_ground_truth(
    image: Image.Image, boxes: np.ndarray, ignore: np.ndarray | None = None
) -> Image.Image:
    """A copy of ``image`` with each ground-truth ``[x1, y1, x2, y2]`` box (pixels) outlined
    thinly in white (ignored ones in grey), to draw predictions over."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    ignore = np.zeros(len(boxes), bool) if ignore is None else np.asarray(ignore, bool)
    for box, ignored in zip(boxes, ignore):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=(128, 128, 128) if ignored else (255, 255, 255))
    return canvas


PR_FIGURE_INCHES = (7.0, 6.0)
PR_FIGURE_DPI = 100  # so pr_curves.png is 700 x 600 pixels


def plot_pr_curves(curves: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """One precision-recall line per curve of an evaluator's ``curves``.

    ``curves`` maps a name (a class, or a WiderFace setting) to a
    :class:`~autoassign.eval.base.PRCurve` (``recall``, ``precision``, ``[P]`` each, and
    ``ap``). The legend names each with its AP
    when there are at most 20; more (Objects365's 365 classes) are drawn thin, unlabelled.
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=PR_FIGURE_INCHES, dpi=PR_FIGURE_DPI)
    many = len(curves) > 20
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(
            curve.recall,
            curve.precision,
            lw=0.6 if many else 1.5,
            alpha=0.5 if many else 1.0,
            color=colors(i % colors.N),
            label=None if many else f"{name} (AP {curve.ap:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title or f"Precision-recall ({len(curves)} curves)")
    ax.grid(alpha=0.3)
    if curves and not many:
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # fixed size: no bbox_inches="tight"
    plt.close(fig)
    return path


def write_pr_curve_report(
    curves: Mapping[str, Any], output_dir: str | Path, title: str = ""
) -> tuple[Path, Path]:
    """Write ``pr_curves.png`` and ``pr_curves.json`` (name -> recall, precision, ap)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, curve in curves.items():
        data[name] = {
            "recall": [round(float(v), 6) for v in curve.recall],
            "precision": [round(float(v), 6) for v in curve.precision],
            "ap": float(curve.ap),
        }
    json_path = output_dir / "pr_curves.json"
    json_path.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return plot_pr_curves(curves, output_dir / "pr_curves.png", title), json_path


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
