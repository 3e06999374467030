"""ResNet backbones (18/34/50/101) that return the C3, C4, C5 feature maps.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, blocks
with ``conv1..3``, ``bn1..3``, ``downsample.0/1``), which is also mmdetection's naming, so
ImageNet and reference checkpoints map onto it without renaming inside the backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

__all__ = ["FrozenBatchNorm2d", "ResNetBackbone", "build_resnet", "RESNET_SPECS"]

RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
"""depth -> (block type, blocks per stage)."""


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, never trained).

    Same buffers as torchvision's ``FrozenBatchNorm2d`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``); the forward is one fused inference-mode batch norm
    instead of two elementwise passes, which matters on a 50-layer backbone.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Trainable BatchNorm checkpoints carry a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """``"frozen_bn"`` (the reference), ``"bn"`` (trainable) or ``"gn"`` (GroupNorm(32))."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'frozen_bn', 'bn' or 'gn'")


def _move_stride_to_first_conv(block: Bottleneck) -> None:
    """Caffe style: the stride of a downsampling bottleneck sits in its first 1x1 conv."""
    stride = block.conv2.stride
    block.conv1 = conv1x1(block.conv1.in_channels, block.conv1.out_channels, stride=stride[0])
    block.conv2 = conv3x3(block.conv2.in_channels, block.conv2.out_channels, stride=1)


class ResNetBackbone(nn.Module):
    """A ResNet without its classifier; ``forward`` returns ``[C3, C4, C5]``.

    Args:
        depth: 18, 34, 50 or 101.
        style: ``"caffe"`` (stride 2 in the first 1x1 conv of a downsampling bottleneck) or
            ``"pytorch"`` (stride in the 3x3). For basic blocks (18/34) both are the same.
        norm: ``"frozen_bn"``, ``"bn"`` or ``"gn"``.
        frozen_stages: -1 freezes nothing, 0 the stem, k >= 1 the stem and stages 1..k.
            Frozen parts get ``requires_grad=False`` and stay in eval mode.

    Shapes: input ``[B, 3, H, W]`` (normalised); outputs with strides 8, 16, 32 and
    ``out_channels`` channels (128/256/512 for basic blocks, 512/1024/2048 for bottlenecks).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        style: str = "caffe",
        norm: str = "frozen_bn",
        frozen_stages: int = 1,
    ):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of 18, 34, 50, 101")
        if style not in ("caffe", "pytorch"):
            raise ValueError(f"unknown ResNet style {style!r}; expected 'caffe' or 'pytorch'")
        block, layers = RESNET_SPECS[depth]
        make_norm = norm_layer_factory(norm)
        self.depth, self.style, self.frozen_stages = depth, style, frozen_stages

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = 64
        for index, (num_blocks, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if index == 0 else 2
            stage, in_channels = self._make_stage(
                block, in_channels, width, num_blocks, stride, make_norm, style
            )
            self.add_module(f"layer{index + 1}", stage)

        expansion = block.expansion
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.strides = [8, 16, 32]
        self._init_weights()
        self._freeze()

    @staticmethod
    def _make_stage(block, in_channels, width, num_blocks, stride, make_norm, style):
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                conv1x1(in_channels, out_channels, stride), make_norm(out_channels)
            )
        blocks = [block(in_channels, width, stride, downsample, norm_layer=make_norm)]
        blocks += [block(out_channels, width, norm_layer=make_norm) for _ in range(1, num_blocks)]
        if style == "caffe" and block is Bottleneck and stride != 1:
            _move_stride_to_first_conv(blocks[0])
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages."""
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.conv1, self.bn1]
        modules += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return modules

    def _freeze(self) -> None:
        for module in self.frozen_modules():
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        # Frozen stages keep fixed statistics even when the detector trains.
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def build_resnet(
    *, depth: int = 50, style: str = "caffe", norm: str = "frozen_bn", frozen_stages: int = 1
) -> ResNetBackbone:
    """A randomly initialised ResNet backbone; load ImageNet weights with ``weights.py``."""
    return ResNetBackbone(depth=depth, style=style, norm=norm, frozen_stages=frozen_stages)
