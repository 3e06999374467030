"""The learnable per-class Gaussian center prior of AutoAssign, and its ablations."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

PriorKind = Literal["gaussian", "uniform"]


class CenterPrior(nn.Module):
    """Per-class Gaussian over a point's offset from its box centre, in level strides.

    For a point ``(px, py)`` on a level of stride ``s`` and a box of class ``c`` with centre
    ``(cx, cy)``, the offset is ``d = ((px - cx) / s, (py - cy) / s)`` and the prior is
    ``exp(-(d_x - mean[c, 0])^2 / (2 sigma[c, 0]^2))
    * exp(-(d_y - mean[c, 1])^2 / (2 sigma[c, 1]^2))``.

    Two ablations of the paper's design (both off by default):

    - ``learnable=False``: ``mean`` and ``sigma`` keep their initial values (no gradient, and
      so no optimizer update or weight decay);
    - ``kind="uniform"``: every point inside a box weighs 1, wherever it lies (no center
      weighting). ``mean`` and ``sigma`` then stay at their initial values too; only
      ``force_topk`` still reads them, through :meth:`density`, to rank the points of boxes
      that have none inside.

    Args:
        num_classes: number of object classes ``C``.
        mean_init: initial ``mean`` of every class, ``(x, y)`` in strides.
        sigma_init: initial ``sigma`` of every class, ``(x, y)`` in strides, both > 0.
        kind: ``"gaussian"`` (the paper) or ``"uniform"``.
        learnable: whether ``mean`` and ``sigma`` are trained.

    Attributes:
        mean: ``[C, 2]`` centre offset.
        sigma: ``[C, 2]`` spread.
    """

    def __init__(
        self,
        num_classes: int,
        mean_init=(0.0, 0.0),
        sigma_init=(1.0, 1.0),
        *,
        kind: PriorKind = "gaussian",
        learnable: bool = True,
    ):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"CenterPrior: num_classes must be > 0, got {num_classes}")
        if len(mean_init) != 2 or len(sigma_init) != 2:
            raise ValueError("CenterPrior: mean_init and sigma_init must each have 2 values (x, y)")
        if min(sigma_init) <= 0:
            raise ValueError(f"CenterPrior: sigma_init must be > 0, got {tuple(sigma_init)}")
        if kind not in ("gaussian", "uniform"):
            raise ValueError(f"CenterPrior: kind must be 'gaussian' or 'uniform', got {kind!r}")
        self.num_classes = num_classes
        self.kind = kind
        # A uniform prior does not depend on them: trainable, they would get no gradient.
        trained = learnable and kind == "gaussian"
        self.mean = nn.Parameter(
            torch.tensor(mean_init, dtype=torch.float32).repeat(num_classes, 1),
            requires_grad=trained,
        )
        self.sigma = nn.Parameter(
            torch.tensor(sigma_init, dtype=torch.float32).repeat(num_classes, 1),
            requires_grad=trained,
        )

    @property
    def learnable(self) -> bool:
        return self.mean.requires_grad

    def density(self, offsets: Tensor, labels: Tensor) -> Tensor:
        """The Gaussian of (point, box) pairs, whatever :attr:`kind` is.

        Args:
            offsets: ``[..., 2]`` point minus box centre, divided by the point's level stride.
            labels: ``[...]`` int64 class of each pair's box.

        Returns:
            ``[...]`` values in ``[0, 1]``, differentiable w.r.t. ``mean`` and ``sigma``.
        """
        mean = self.mean[labels].to(offsets.dtype)  # [..., 2]
        sigma = self.sigma[labels].to(offsets.dtype)  # [..., 2]
        distance = (offsets - mean) ** 2
        return torch.exp(-distance / (2 * sigma**2)).prod(dim=-1)

    def forward(self, offsets: Tensor, labels: Tensor) -> Tensor:
        """Prior weights of (point, box) pairs (arguments and shapes as :meth:`density`):
        the Gaussian, or ones for ``kind="uniform"``."""
        if self.kind == "uniform":
            return offsets.new_ones(offsets.shape[:-1])
        return self.density(offsets, labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, kind={self.kind}, learnable={self.learnable}"
