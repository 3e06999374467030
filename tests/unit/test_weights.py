"""Weights files: ImageNet backbones in three namings, mmdetection checkpoints, bad files."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
import torchvision
from torch import nn

from autoassign.config import ExperimentConfig, ModelConfig
from autoassign.engine.checkpoint import save_checkpoint
from autoassign.errors import AutoAssignError, CheckpointError
from autoassign.model import build_detector
from autoassign.model.backbone import build_resnet
from autoassign.model.weights import (
    WeightsError,
    from_mmdet_state_dict,
    load_backbone_weights,
    load_state_dict_checked,
    to_mmdet_state_dict,
)

torch.set_num_threads(1)


def small_config(**overrides) -> ModelConfig:
    settings = {
        "num_classes": 3,
        "fpn_channels": 64,
        "backbone": {"depth": 18},
        "head": {"num_convs": 1},
    }
    settings.update(overrides)
    return ModelConfig(**settings)


def randomize_small_tensors_(module: nn.Module, seed: int) -> None:
    """Random positive values in every bias, norm parameter/statistic, scale and prior, so
    that a loaded model only matches when every one of them arrived (conv weights are
    already random from the initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dim() <= 1:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


def raw_outputs(model, images):
    """Head outputs ``(cls, bbox, obj)`` per level, for exact comparisons."""
    with torch.no_grad():
        batch, _ = model.preprocess(images)
        return model.head(model.fpn(model.backbone(batch)))


def assert_same_outputs(first, second):
    for outputs_a, outputs_b in zip(first, second):
        for a, b in zip(outputs_a, outputs_b):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained_like_model():
    torch.manual_seed(0)
    model = build_detector(small_config()).eval()
    randomize_small_tensors_(model, seed=1)
    return model


IMAGES = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(2)) * 255]


def test_mmdet_names_and_round_trip(trained_like_model):
    ours = trained_like_model.state_dict()
    mm = to_mmdet_state_dict(ours)
    assert not any(key.startswith(("fpn.", "head.")) for key in mm)
    assert mm["neck.fpn_convs.3.conv.weight"] is ours["fpn.p6.weight"]
    assert mm["neck.fpn_convs.3.conv.weight"].shape == (64, 512, 3, 3)  # P6 on C5
    assert mm["neck.fpn_convs.4.conv.weight"] is ours["fpn.p7.weight"]
    assert mm["neck.lateral_convs.2.conv.bias"] is ours["fpn.lateral_convs.2.bias"]
    assert mm["neck.fpn_convs.0.conv.weight"] is ours["fpn.output_convs.0.weight"]
    assert mm["bbox_head.cls_convs.0.gn.weight"] is ours["head.cls_tower.0.norm.weight"]
    assert mm["bbox_head.reg_convs.0.conv.bias"] is ours["head.reg_tower.0.conv.bias"]
    assert mm["bbox_head.conv_centerness.weight"] is ours["head.objectness.weight"]
    assert mm["bbox_head.conv_reg.bias"] is ours["head.bbox_reg.bias"]
    assert mm["bbox_head.conv_cls.weight"].shape == (3, 64, 3, 3)
    assert mm["bbox_head.scales.4.scale"] is ours["head.scales.4.scale"]
    assert mm["bbox_head.center_prior.sigma"] is ours["head.center_prior.sigma"]
    assert (
        mm["backbone.layer2.0.downsample.1.running_var"]
        is ours["backbone.layer2.0.downsample.1.running_var"]
    )
    assert mm["backbone.bn1.num_batches_tracked"].dtype == torch.int64

    back = from_mmdet_state_dict(mm)
    assert set(back) == set(ours)
    fresh = build_detector(small_config()).eval()
    fresh.load_state_dict(back, strict=True)
    assert_same_outputs(raw_outputs(fresh, IMAGES), raw_outputs(trained_like_model, IMAGES))


def test_mmdet_checkpoint_file_loads_through_config(tmp_path, trained_like_model):
    path = tmp_path / "autoassign_r50_mmdet.pth"
    state_dict = to_mmdet_state_dict(trained_like_model.state_dict())
    torch.save({"meta": {"epoch": 12, "CLASSES": ("a", "b", "c")}, "state_dict": state_dict}, path)
    loaded = build_detector(small_config(checkpoint=path)).eval()
    assert_same_outputs(raw_outputs(loaded, IMAGES), raw_outputs(trained_like_model, IMAGES))
    fresh = build_detector(small_config()).eval()
    assert not torch.equal(raw_outputs(fresh, IMAGES)[0][0], raw_outputs(loaded, IMAGES)[0][0])


@pytest.mark.parametrize("wrap", ["plain", "model_key", "ddp"])
def test_our_checkpoint_file_loads_through_config(tmp_path, trained_like_model, wrap):
    state_dict = trained_like_model.state_dict()
    if wrap == "model_key":
        content = {"model": state_dict, "epoch": 3}
    elif wrap == "ddp":
        content = {f"module.{k}": v for k, v in state_dict.items()}
    else:
        content = state_dict
    path = tmp_path / "ours.pt"
    torch.save(content, path)
    loaded = build_detector(small_config(checkpoint=path)).eval()
    assert_same_outputs(raw_outputs(loaded, IMAGES), raw_outputs(trained_like_model, IMAGES))


def test_broken_checkpoint_lists_missing_and_unexpected_keys(tmp_path, trained_like_model):
    mm = to_mmdet_state_dict(trained_like_model.state_dict())
    del mm["bbox_head.conv_cls.bias"]
    mm["bbox_head.conv_extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": mm}, path)
    with pytest.raises(WeightsError) as error:
        build_detector(small_config(checkpoint=path))
    message = str(error.value)
    assert str(path) in message
    assert re.search(r"missing keys \(1\): \['head\.cls_logits\.bias'\]", message)
    assert re.search(r"unexpected keys \(1\): \['bbox_head\.conv_extra\.weight'\]", message)
    assert isinstance(error.value, AutoAssignError)


def test_checkpoint_for_another_class_count_is_reported(tmp_path, trained_like_model):
    path = tmp_path / "three_classes.pth"
    torch.save(trained_like_model.state_dict(), path)
    with pytest.raises(WeightsError, match=r"three_classes\.pth.*head\.cls_logits\.weight"):
        build_detector(small_config(num_classes=5, checkpoint=path))


def test_one_loader_reports_every_mismatch_with_its_context(trained_like_model):
    state = dict(trained_like_model.state_dict())
    del state["head.cls_logits.bias"]
    state["head.extra.weight"] = torch.zeros(2)
    state["fpn.p6.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(WeightsError) as error:
        load_state_dict_checked(
            build_detector(small_config()),
            state,
            source="ckpt.pt",
            target="the model of this config",
            hint="resume with the config the checkpoint was trained with",
        )
    assert str(error.value) == (
        "ckpt.pt: does not fit the model of this config (missing keys (1): "
        "['head.cls_logits.bias']; unexpected keys (1): ['head.extra.weight']; shape "
        "mismatches (1): ['fpn.p6.weight: file (1, 1, 3, 3), model (64, 512, 3, 3)']); "
        "resume with the config the checkpoint was trained with"
    )
    assert isinstance(error.value, CheckpointError)  # what the CLIs and the registry catch


def test_predictor_names_the_checkpoint_whose_weights_do_not_fit(tmp_path, trained_like_model):
    from autoassign.predict import Predictor

    config = ExperimentConfig(model=small_config())
    state = dict(trained_like_model.state_dict())
    del state["head.objectness.weight"]
    path = save_checkpoint(
        {"model": state, "config": config.model_dump(mode="json"), "epoch": 1, "iteration": 1},
        tmp_path / "checkpoint.pt",
    )
    with pytest.raises(CheckpointError) as error:
        Predictor(path, device="cpu")
    assert str(error.value).startswith(
        f"{path}: does not fit the model of its config (missing keys (1): "
        "['head.objectness.weight'])"
    )


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pth: cannot read"):
        build_detector(small_config(checkpoint=garbage))
    with pytest.raises(WeightsError, match=r"absent\.pth: weights file not found"):
        build_detector(small_config(checkpoint=tmp_path / "absent.pth"))


# --------------------------------------------------------------------------------------------
# ImageNet backbones
# --------------------------------------------------------------------------------------------


def torchvision_c5(resnet: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_imagenet_weights(tmp_path, depth):
    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    randomize_small_tensors_(reference, seed=3)
    path = tmp_path / f"resnet{depth}-imagenet.pth"
    torch.save(reference.state_dict(), path)  # with fc.* and num_batches_tracked
    cfg = small_config(backbone={"depth": depth, "style": "pytorch", "weights": path})
    model = build_detector(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = model.backbone(x)[2]
        torch.testing.assert_close(c5, torchvision_c5(reference, x))
        random_c5 = build_detector(small_config(backbone={"depth": depth})).backbone.eval()(x)[2]
    assert not torch.allclose(random_c5, c5)


def to_detectron2_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision-named ResNet weights in detectron2's naming (written independently of the
    library's converter, from detectron2's documented layout)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "conv1":
            new = "stem.conv1." + parts[1]
        elif parts[0] == "bn1":
            new = "stem.conv1.norm." + parts[1]
        else:
            stage = int(parts[0][len("layer") :]) + 1
            block, module, field = parts[1], parts[2], parts[-1]
            if module == "downsample":
                new = f"shortcut.{field}" if parts[3] == "0" else f"shortcut.norm.{field}"
            elif module.startswith("bn"):
                new = f"conv{module[2:]}.norm.{field}"
            else:
                new = f"{module}.{field}"
            new = f"res{stage}.{block}.{new}"
        out[new] = value
    return out


def to_caffe2_blobs(state_dict: dict[str, torch.Tensor], eps=1e-5) -> dict[str, object]:
    """The same weights as Caffe2 blobs, with each frozen BN folded into a bare affine."""
    blobs = {}
    for key, value in state_dict.items():
        if not key.endswith("weight") or value.dim() != 4:
            continue
        prefix = key[: -len("weight")]
        if prefix == "conv1.":
            name, norm = "conv1", "bn1."
        else:
            layer, block, module = prefix.split(".")[:3]
            stage = int(layer[len("layer") :]) + 1
            if module == "downsample":
                name, norm = f"res{stage}_{block}_branch1", f"{layer}.{block}.downsample.1."
            else:
                branch = {"conv1": "2a", "conv2": "2b", "conv3": "2c"}[module]
                name, norm = f"res{stage}_{block}_branch{branch}", f"{layer}.{block}.bn{module[4]}."
        scale = state_dict[norm + "weight"] / (state_dict[norm + "running_var"] + eps).sqrt()
        shift = state_dict[norm + "bias"] - state_dict[norm + "running_mean"] * scale
        bn_name = "res_conv1_bn" if name == "conv1" else f"{name}_bn"
        blobs[f"{name}_w"] = value.numpy()
        blobs[f"{bn_name}_s"], blobs[f"{bn_name}_b"] = scale.numpy(), shift.numpy()
    blobs["fc1000_w"] = torch.zeros(1000, 2048).numpy()
    blobs["conv1_w_momentum"] = torch.zeros(1).numpy()
    return blobs


@pytest.fixture(scope="module")
def caffe_r50_source():
    torch.manual_seed(5)
    source = build_resnet(depth=50, style="caffe").eval()
    randomize_small_tensors_(source, seed=6)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return source, x, source(x)


@pytest.mark.parametrize("file_format", ["pkl", "torch"])
def test_detectron2_caffe_r50_weights(tmp_path, caffe_r50_source, file_format):
    source, x, expected = caffe_r50_source
    named = to_detectron2_names(source.state_dict())
    assert "res2.0.conv1.norm.running_var" in named and "res5.0.shortcut.weight" in named
    if file_format == "pkl":
        path = tmp_path / "R-50.pkl"
        arrays = {k: v.numpy() for k, v in named.items()}
        path.write_bytes(pickle.dumps({"model": arrays, "__author__": "MSRA"}))
    else:
        path = tmp_path / "R-50.pth"
        torch.save(named, path)
    model = build_detector(small_config(backbone={"depth": 50, "weights": path})).eval()
    with torch.no_grad():
        outputs = model.backbone(x)
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)


def test_caffe2_blob_weights(tmp_path, caffe_r50_source):
    source, x, expected = caffe_r50_source
    path = tmp_path / "R-50-caffe2.pkl"
    path.write_bytes(pickle.dumps(to_caffe2_blobs(source.state_dict()), protocol=2))
    backbone = build_resnet(depth=50, style="caffe").eval()
    load_backbone_weights(backbone, path)
    with torch.no_grad():
        outputs = backbone(x)
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"conv1.weight": _RunsCode()}}))
    with pytest.raises(WeightsError, match=r"evil\.pkl: cannot read weights: refusing to load"):
        load_backbone_weights(build_resnet(depth=18), path)


def test_backbone_weights_of_another_depth_are_reported(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as error:
        load_backbone_weights(build_resnet(depth=50), path)
    message = str(error.value)
    assert "resnet18.pth" in message and "layer1.0.conv3.weight" in message
    assert "missing keys" in message
