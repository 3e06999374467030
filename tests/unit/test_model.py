"""Backbone, FPN, head and detector: shapes, strides, freezing, initialisation, input handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoassign.config import ModelConfig
from autoassign.model import build_detector
from autoassign.model.backbone import FrozenBatchNorm2d, build_resnet
from autoassign.model.fpn import FPN
from autoassign.model.head import AutoAssignHead

torch.set_num_threads(1)


def small_config(**overrides) -> ModelConfig:
    settings = {
        "num_classes": 3,
        "fpn_channels": 32,
        "backbone": {"depth": 18},
        "head": {"num_convs": 1},
    }
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.mark.parametrize(
    ("depth", "style", "channels"),
    [
        (18, "caffe", [128, 256, 512]),
        (18, "pytorch", [128, 256, 512]),
        (34, "pytorch", [128, 256, 512]),
        (50, "caffe", [512, 1024, 2048]),
        (50, "pytorch", [512, 1024, 2048]),
        (101, "caffe", [512, 1024, 2048]),
    ],
)
def test_backbone_outputs_c3_c4_c5_with_strides_8_16_32(depth, style, channels):
    backbone = build_resnet(depth=depth, style=style).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [
        (1, channels[0], 8, 12),
        (1, channels[1], 4, 6),
        (1, channels[2], 2, 3),
    ]
    assert backbone.out_channels == channels
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == blocks


@pytest.mark.parametrize(
    ("style", "conv1_stride", "conv2_stride"), [("caffe", 2, 1), ("pytorch", 1, 2)]
)
def test_bottleneck_stride_position_depends_on_style(style, conv1_stride, conv2_stride):
    backbone = build_resnet(depth=50, style=style)
    first = backbone.layer1[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (1, 1)
    for stage in (backbone.layer2, backbone.layer3, backbone.layer4):
        assert stage[0].conv1.stride == (conv1_stride, conv1_stride)
        assert stage[0].conv2.stride == (conv2_stride, conv2_stride)
        assert stage[0].downsample[0].stride == (2, 2)
        # Only the first block of a stage downsamples.
        for block in stage[1:]:
            assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)


def test_frozen_stages_and_frozen_batchnorm():
    backbone = build_resnet(depth=18, norm="frozen_bn", frozen_stages=1)
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert "conv1.weight" not in trainable
    assert not any(name.startswith("layer1.") for name in trainable)
    assert "layer2.0.conv1.weight" in trainable and "layer4.1.conv2.weight" in trainable
    # Frozen BN has buffers only: every trainable parameter is a conv weight.
    owners = {backbone.get_submodule(name.rsplit(".", 1)[0]) for name in trainable}
    assert all(isinstance(owner, nn.Conv2d) for owner in owners)

    nothing_frozen = build_resnet(depth=18, norm="bn", frozen_stages=-1)
    assert all(p.requires_grad for p in nothing_frozen.parameters())


def test_frozen_stages_stay_in_eval_mode_with_trainable_bn():
    backbone = build_resnet(depth=18, norm="bn", frozen_stages=1).train()
    assert not backbone.bn1.training and not backbone.layer1[0].bn1.training
    assert backbone.layer2[0].bn1.training
    assert not backbone.layer1[0].bn1.weight.requires_grad
    stats_before = backbone.layer1[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32))
    assert torch.equal(backbone.layer1[0].bn1.running_mean, stats_before)
    gn = build_resnet(depth=18, norm="gn")
    assert isinstance(gn.layer2[0].bn1, nn.GroupNorm) and gn.layer2[0].bn1.num_groups == 32


def test_frozen_batchnorm_matches_eval_batchnorm():
    reference = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for buffer in (reference.weight, reference.bias, reference.running_mean):
            buffer.copy_(torch.randn(8))
        reference.running_var.copy_(torch.rand(8) + 0.5)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(reference.state_dict())  # drops num_batches_tracked
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), reference(x))


def test_fpn_levels_and_p6_from_c5():
    fpn = FPN(in_channels=[16, 32, 64], out_channels=32)
    c3, c4, c5 = torch.randn(1, 16, 16, 24), torch.randn(1, 32, 8, 12), torch.randn(1, 64, 4, 6)
    with torch.no_grad():
        outputs = fpn([c3, c4, c5])
        assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
        assert all(o.shape[1] == 32 for o in outputs)
        assert fpn.p6.in_channels == 64  # C5's channels, not P5's
        torch.testing.assert_close(outputs[3], fpn.p6(c5))
        torch.testing.assert_close(outputs[4], fpn.p7(torch.relu(outputs[3])))
        p5 = fpn.output_convs[2](fpn.lateral_convs[2](c5))
        torch.testing.assert_close(outputs[2], p5)
    for conv in [*fpn.lateral_convs, *fpn.output_convs, fpn.p6, fpn.p7]:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)  # Kaiming-uniform with a=1
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.8 * bound
        assert torch.count_nonzero(conv.bias) == 0


def test_head_initial_values():
    head = AutoAssignHead(in_channels=32, num_classes=5, strides=[8, 16, 32], num_convs=2)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((5,), -math.log(49.0)))
    torch.testing.assert_close(head.bbox_reg.bias, torch.full((4,), 4.0))
    torch.testing.assert_close(head.objectness.bias, torch.zeros(1))
    assert [s.scale.item() for s in head.scales] == [1.0, 1.0, 1.0]
    assert head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert head.cls_tower[0].conv.weight.std().item() == pytest.approx(0.01, rel=0.2)
    norm = head.cls_tower[0].norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
    assert head.center_prior.mean.shape == (5, 2) and head.center_prior.sigma.shape == (5, 2)
    torch.testing.assert_close(head.center_prior.sigma.detach(), torch.ones(5, 2))


def test_objectness_reads_the_regression_tower_and_distances_scale_with_stride():
    torch.manual_seed(0)
    head = AutoAssignHead(in_channels=32, num_classes=2, strides=[8, 16], num_convs=1)
    features = [torch.randn(1, 32, 6, 6), torch.randn(1, 32, 3, 3)]
    with torch.no_grad():
        head.scales[1].scale.fill_(0.5)
        head.bbox_reg.bias.fill_(0.0)  # some raw distances negative: the relu matters
        _, bbox, obj = head(features)
        head.cls_tower[0].conv.weight.mul_(3.0)
        _, _, obj_after_cls_change = head(features)
        head.reg_tower[0].conv.weight.mul_(3.0)
        _, _, obj_after_reg_change = head(features)
        raw = head.bbox_reg(head.reg_tower(features[1]))
    torch.testing.assert_close(obj_after_cls_change[0], obj[0])
    assert not torch.allclose(obj_after_reg_change[0], obj[0])
    # Level 1 after the reg-tower change: relu(0.5 * reg) * 16.
    _, bbox_after, _ = head(features)
    torch.testing.assert_close(bbox_after[1], torch.relu(0.5 * raw) * 16)
    assert (bbox[0] >= 0).all() and (bbox[0] == 0).any()
    assert bbox[0].dtype == torch.float32


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_input_normalisation_and_padding(style):
    model = build_detector(small_config(backbone={"depth": 18, "style": style}))
    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    image[:, 3, 4] = torch.tensor([10, 20, 30], dtype=torch.uint8)  # R, G, B
    batch, sizes = model.preprocess([image, torch.full((3, 33, 20), 255.0)])
    assert batch.shape == (2, 3, 64, 64) and sizes == [(40, 50), (33, 20)]
    if style == "caffe":  # BGR minus the caffe means
        expected = torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717])
    else:
        expected = (torch.tensor([10, 20, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / (
            torch.tensor([0.229, 0.224, 0.225])
        )
    torch.testing.assert_close(batch[0, :, 3, 4], expected)
    for i, (h, w) in enumerate(sizes):
        assert torch.count_nonzero(batch[i, :, h:]) == 0
        assert torch.count_nonzero(batch[i, :, :, w:]) == 0
    assert (batch[1, :, :33, :20] != 0).all()

    # The same images as a zero-padded 0..255 batch give the same normalised batch.
    padded = torch.zeros(2, 3, 40, 50, dtype=torch.uint8)
    padded[0] = image
    padded[1, :, :33, :20] = 255
    batch_from_tensor, sizes_from_tensor = model.preprocess(padded, [(40, 50), (33, 20)])
    assert sizes_from_tensor == sizes
    torch.testing.assert_close(batch_from_tensor, batch)


def test_training_forward_returns_losses_and_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_detector(small_config()).train()
    images = [torch.rand(3, 64, 80) * 255, torch.rand(3, 48, 64) * 255]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 50.0, 40.0], [30.0, 20.0, 70.0, 60.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_pos", "loss_neg", "loss_center"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert "head.center_prior.mean" in dict(trainable)
    without_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert without_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="targets"):
        model(images)
