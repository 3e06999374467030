"""Loading weights from local files: ImageNet backbones and whole-detector checkpoints.

ImageNet weights named in a config (``msra:R-50``, ``torchvision:IMAGENET1K_V2``) are
fetched into torch hub's cache first by :mod:`autoassign.model.pretrained`, then read here.

Backbone ImageNet weights come in three namings, all mapped onto torchvision's ResNet names
(which our backbone uses):

- torchvision: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.*``;
- detectron2 (its converted MSRA caffe R-50 and friends): ``stem.conv1.weight``,
  ``stem.conv1.norm.*``, ``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.*``;
- Caffe2/Detectron1 blobs (the original MSRA pickle): ``conv1_w``, ``res_conv1_bn_s``,
  ``res2_0_branch2a_w``, ``res2_0_branch2a_bn_{s,b}``, ``res2_0_branch1_w``.

Detector checkpoints are ours (``backbone.* fpn.* head.*``) or mmdetection's
(``backbone.* neck.* bbox_head.*``, converted with :func:`from_mmdet_state_dict`).

Files are read with ``torch.load(..., weights_only=True)``; ``.pkl`` files with an unpickler
that accepts nothing but dicts, lists and numpy arrays.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from autoassign.errors import CheckpointError, ConfigError
from autoassign.weight_names import check_weights_name, is_weights_name

__all__ = [
    "WeightsError",
    "read_weights_file",
    "backbone_state_dict_from_imagenet",
    "load_backbone_weights",
    "load_state_dict_checked",
    "to_mmdet_state_dict",
    "from_mmdet_state_dict",
    "detector_state_dict_from_checkpoint",
    "load_detector_checkpoint",
]


class WeightsError(CheckpointError):
    """A weights file that cannot be read or does not fit the model; names the file."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol-2 pickles written by Python 3 store an array's raw bytes through this.
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy arrays need: no code runs while loading."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays)")


def _read_pickle(path: Path) -> object:
    data = path.read_bytes()
    # Detectron's pickles were written by Python 2: latin1 decodes their byte strings.
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_weights_file(path: str | Path) -> dict[str, object]:
    """The top-level dict of a ``torch.save`` file or of a numpy-array pickle (``.pkl``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".pkl":
            obj = _read_pickle(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and pickle raise many types for a bad file
        raise WeightsError(f"{path}: cannot read weights: {error}") from error
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _tensor_dict(path: Path, raw: Mapping[str, object]) -> dict[str, Tensor]:
    """Values as tensors (numpy arrays converted); anything else is an error naming the key."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def _unwrap(path: Path, obj: dict[str, object]) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: under ``state_dict`` (mmdetection), ``model``
    (detectron2, our trainer) or ``blobs`` (Detectron1), or the file itself."""
    for key in ("state_dict", "model", "blobs"):
        if isinstance(obj.get(key), Mapping):
            obj = dict(obj[key])
            break
    # Detectron1 files carry optimizer momenta next to the weights.
    obj = {k: v for k, v in obj.items() if not k.endswith("_momentum")}
    return _tensor_dict(path, obj)


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str | Path,
    target: str = "the model",
    hint: str = "",
) -> None:
    """``module.load_state_dict`` with every mismatch reported in one :class:`WeightsError`.

    The one place where weights are loaded into a model: ImageNet backbones, detector
    checkpoints named in a config, training checkpoints being resumed and checkpoints being
    served. The message lists the missing and unexpected keys and the shape mismatches, all
    of them: ``"<source>: does not fit <target> (missing keys (1): [...]); <hint>"``.

    Args:
        source: what the weights came from (a file, or a file and what it holds).
        target: what they were meant for, e.g. ``"the model of this config"``.
        hint: what the user can do about a mismatch, appended after a semicolon.
    """
    expected = module.state_dict()
    # A BatchNorm step counter is meaningless for frozen statistics, whichever side lacks it.
    counter = "num_batches_tracked"
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith(counter)}
    missing = [k for k in expected if k not in state_dict and not k.endswith(counter)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {keys}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        message = f"{source}: does not fit {target} ({'; '.join(problems)})"
        raise WeightsError(f"{message}; {hint}" if hint else message)
    module.load_state_dict(state_dict, strict=False)


# --------------------------------------------------------------------------------------------
# ImageNet backbones
# --------------------------------------------------------------------------------------------


def _from_detectron2_name(key: str) -> str | None:
    """detectron2 ResNet name -> torchvision name; None for the classifier."""
    key = key.removeprefix("backbone.bottom_up.")
    if key.startswith(("linear.", "fc.")):
        return None
    key = re.sub(r"^stem\.conv1\.norm\.", "bn1.", key)
    key = re.sub(r"^stem\.conv1\.", "conv1.", key)
    match = re.match(r"^res(\d)\.(\d+)\.(.*)$", key)
    if match is None:
        return key
    stage, block, rest = int(match[1]) - 1, match[2], match[3]
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return f"layer{stage}.{block}.{rest}"


_C2_SUFFIXES = {"_w": "weight", "_b": "bias", "_bn_s": "weight", "_bn_b": "bias"}
_C2_SUFFIXES |= {"_bn_rm": "running_mean", "_bn_riv": "running_var"}
_C2_BRANCHES = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}
_C2_BRANCHES["branch1"] = "shortcut"


def _from_caffe2_name(key: str) -> str | None:
    """Caffe2/Detectron1 blob name -> torchvision name; None for the classifier."""
    if key.startswith("fc1000"):
        return None
    for suffix in sorted(_C2_SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            stem, field = key[: -len(suffix)], _C2_SUFFIXES[suffix]
            is_norm = suffix.startswith("_bn")
            break
    else:
        return key
    if stem in ("conv1", "res_conv1"):
        return f"bn1.{field}" if is_norm else f"conv1.{field}"
    match = re.match(r"^res(\d)_(\d+)_(branch2a|branch2b|branch2c|branch1)$", stem)
    if match is None:
        return key
    layer, block, branch = int(match[1]) - 1, match[2], _C2_BRANCHES[match[3]]
    if branch == "shortcut":
        return f"layer{layer}.{block}.downsample.{1 if is_norm else 0}.{field}"
    index = branch[-1]
    return f"layer{layer}.{block}.{'bn' if is_norm else 'conv'}{index}.{field}"


def _fill_affine_only_norms(state_dict: dict[str, Tensor], eps: float = 1e-5) -> None:
    """Caffe2 stores frozen BN as a bare affine (scale, bias): give it identity statistics.

    ``running_var = 1 - eps`` makes ``weight / sqrt(running_var + eps)`` exactly ``weight``.
    """
    for key in [k for k in state_dict if k.endswith(".weight")]:
        prefix = key[: -len("weight")]
        is_norm = state_dict[key].dim() == 1
        if is_norm and prefix + "running_mean" not in state_dict:
            state_dict[prefix + "running_mean"] = torch.zeros_like(state_dict[key])
            state_dict[prefix + "running_var"] = torch.full_like(state_dict[key], 1.0 - eps)


def backbone_state_dict_from_imagenet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An ImageNet ResNet state dict in any of the three namings, in torchvision naming,
    without the classifier and BatchNorm step counters."""
    keys = list(state_dict)
    if any(k.startswith(("res2.", "stem.", "backbone.bottom_up.")) for k in keys):
        rename = _from_detectron2_name
    elif any(k.startswith("res2_") or k.endswith("_w") for k in keys):
        rename = _from_caffe2_name
    else:
        rename = lambda key: None if key.startswith("fc.") else key  # noqa: E731
    out = {}
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is not None and not new_key.endswith("num_batches_tracked"):
            out[new_key] = value.float() if value.is_floating_point() else value
    if rename is _from_caffe2_name:
        _fill_affine_only_norms(out)
    return out


def load_backbone_weights(backbone: nn.Module, weights: str | Path) -> None:
    """Load ImageNet weights (torchvision, detectron2 or Caffe2 naming) into ``backbone``.

    ``weights`` is a file, or a name (``msra:R-50``, ``torchvision:IMAGENET1K_V2``; see
    :mod:`autoassign.weight_names`) whose file is fetched into torch hub's cache when missing
    (:mod:`autoassign.model.pretrained`). A name must fit the backbone's depth and style.
    """
    source = weights
    if is_weights_name(weights):
        from autoassign.model.pretrained import weights_file

        depth, style = getattr(backbone, "depth", None), getattr(backbone, "style", None)
        try:
            check_weights_name(str(weights), depth=depth, style=style)
        except ValueError as error:
            raise ConfigError(f"model.backbone: {error}") from None
        path = weights_file(weights, depth=depth)
        source = f"{weights} ({path})"
    else:
        path = Path(weights)
    state_dict = backbone_state_dict_from_imagenet(_unwrap(path, read_weights_file(path)))
    load_state_dict_checked(backbone, state_dict, source=f"{source} (backbone weights)")


# --------------------------------------------------------------------------------------------
# Whole detector: ours <-> mmdetection
# --------------------------------------------------------------------------------------------

# (our prefix, mmdetection prefix); "{n}" is a level or block index. Order matters when
# reading mmdetection names: fpn_convs.3 and .4 are P6 and P7, not output convs.
_MMDET_PREFIXES = [
    ("backbone.", "backbone."),
    ("fpn.p6.", "neck.fpn_convs.3.conv."),
    ("fpn.p7.", "neck.fpn_convs.4.conv."),
    ("fpn.lateral_convs.{n}.", "neck.lateral_convs.{n}.conv."),
    ("fpn.output_convs.{n}.", "neck.fpn_convs.{n}.conv."),
    ("head.cls_tower.{n}.conv.", "bbox_head.cls_convs.{n}.conv."),
    ("head.cls_tower.{n}.norm.", "bbox_head.cls_convs.{n}.gn."),
    ("head.reg_tower.{n}.conv.", "bbox_head.reg_convs.{n}.conv."),
    ("head.reg_tower.{n}.norm.", "bbox_head.reg_convs.{n}.gn."),
    ("head.cls_logits.", "bbox_head.conv_cls."),
    ("head.bbox_reg.", "bbox_head.conv_reg."),
    ("head.objectness.", "bbox_head.conv_centerness."),
    ("head.scales.{n}.", "bbox_head.scales.{n}."),
    ("head.center_prior.", "bbox_head.center_prior."),
]


def _prefix_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(r"\{n\}", r"(\d+)"))


_TO_MMDET = [(_prefix_pattern(ours), mm) for ours, mm in _MMDET_PREFIXES]
_FROM_MMDET = [(_prefix_pattern(mm), ours) for ours, mm in _MMDET_PREFIXES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            new_prefix = template.replace("{n}", match[1]) if match.groups() else template
            return new_prefix + key[match.end() :]
    return None


def to_mmdet_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our detector's state dict in mmdetection's AutoAssign naming.

    Backbone BatchNorms get mmdetection's ``num_batches_tracked`` counter (0). Keys with no
    mmdetection counterpart raise ``ValueError``.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        new_key = _rename(key, _TO_MMDET)
        if new_key is None:
            unknown.append(key)
            continue
        out[new_key] = value
        if new_key.startswith("backbone.") and new_key.endswith(".running_var"):
            counter = new_key.removesuffix("running_var") + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    if unknown:
        raise ValueError(f"no mmdetection name for: {unknown}")
    return out


def from_mmdet_state_dict(mm: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An mmdetection AutoAssign state dict in our naming.

    ``num_batches_tracked`` counters are dropped (our BatchNorms are frozen); keys that match
    no rule are passed through unchanged so that loading reports them as unexpected.
    """
    out = {}
    for key, value in mm.items():
        if key.endswith("num_batches_tracked"):
            continue
        new_key = _rename(key, _FROM_MMDET)
        out[key if new_key is None else new_key] = value
    return out


def _is_mmdet_naming(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("neck.", "bbox_head.")) for k in state_dict)


def detector_state_dict_from_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The detector state dict in our naming from a checkpoint file (ours: a state dict or
    ``{"model": state_dict, ...}``; mmdetection: ``{"state_dict": ..., "meta": ...}``)."""
    path = Path(path)
    state_dict = _unwrap(path, read_weights_file(path))
    # A state dict saved from a DistributedDataParallel wrapper.
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if _is_mmdet_naming(state_dict):
        state_dict = from_mmdet_state_dict(state_dict)
    return state_dict


def load_detector_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a whole-detector checkpoint (ours or mmdetection naming) into ``model``."""
    path = Path(path)
    load_state_dict_checked(
        model, detector_state_dict_from_checkpoint(path), source=f"{path} (detector checkpoint)"
    )
