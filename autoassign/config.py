"""The one configuration schema of the library.

What a YAML file can say is exactly these pydantic models: unknown keys and wrong types are
rejected (``extra="forbid"``), and every field has the reference's value as its default.

    ExperimentConfig
      model: ModelConfig        architecture, initialisation, losses, inference thresholds
      data: DataConfig          dataset format, root, splits, input pipeline
      train: TrainConfig        optimizer, learning-rate schedule, precision, checkpoints
      eval: EvalConfig          evaluation protocol options
      seed, output_dir, device
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    """Base for every config block: no unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class BackboneConfig(_Strict):
    """ResNet backbone.

    ``style="caffe"`` puts the stride 2 of a downsampling bottleneck in its first 1x1 conv and
    expects BGR input minus the caffe means; ``style="pytorch"`` puts it in the 3x3 and expects
    RGB scaled to 0..1 and ImageNet-normalised. ``frozen_stages=1`` freezes the stem and
    stage 1 (the reference); ``-1`` freezes nothing. ``norm="frozen_bn"`` is the reference;
    ``"gn"`` or ``"bn"`` train from scratch (the demo on a CPU, where no ImageNet weights exist).
    """

    depth: Literal[18, 34, 50, 101] = 50
    style: Literal["caffe", "pytorch"] = "caffe"
    frozen_stages: int = Field(1, ge=-1, le=4)
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    weights: Path | str | None = None
    """ImageNet weights: a file (torchvision or detectron2/MSRA caffe naming), or a name fetched
    into torch hub's cache on first use (``msra:R-50``, ``msra:R-101`` for style caffe;
    ``torchvision:IMAGENET1K_V1``, ``torchvision:IMAGENET1K_V2`` for style pytorch; see
    ``autoassign.weight_names``); None = random. A name stays a string, a path is a Path."""

    @field_validator("weights", mode="before")
    @classmethod
    def _name_or_path(cls, value: object) -> object:
        """Only ``msra:`` and ``torchvision:`` strings are names; any other string is a path."""
        from autoassign.weight_names import is_weights_name

        if isinstance(value, str) and not is_weights_name(value):
            return Path(value)
        return value

    @model_validator(mode="after")
    def _named_weights_fit(self) -> BackboneConfig:
        """A name must exist for this depth and fit this style and norm (checked here, not
        when the weights are loaded, so that a sweep's trials are refused before they start)."""
        if isinstance(self.weights, str):
            from autoassign.weight_names import check_weights_name

            check_weights_name(self.weights, depth=self.depth, style=self.style, norm=self.norm)
        return self


class HeadConfig(_Strict):
    num_convs: int = Field(4, ge=0)
    """Conv + GroupNorm + ReLU blocks in each of the two towers."""
    prior_prob: float = Field(0.02, gt=0, lt=1)
    """Initial class probability: the cls bias is ``-log((1 - p) / p)``."""
    reg_bias_init: float = 4.0


class CenterPriorConfig(_Strict):
    """Initial value of the learnable per-class Gaussian center prior (in strides)."""

    mean_init: tuple[float, float] = (0.0, 0.0)
    sigma_init: tuple[float, float] = (1.0, 1.0)
    force_topk: int = Field(0, ge=0)
    """Reference default 0 (off). With k > 0, a box with no inside point gets its k
    highest-prior points (over all levels) marked inside; the reference uses k=9 when on."""
    learnable: bool = True
    """Ablation switch: ``false`` keeps ``mean`` and ``sigma`` at their initial values."""
    kind: Literal["gaussian", "uniform"] = "gaussian"
    """Ablation switch: ``uniform`` weighs every point inside a box alike (no center
    weighting; ``mean`` and ``sigma`` are not trained and only rank ``force_topk`` points)."""

    @field_validator("mean_init", "sigma_init", mode="before")
    @classmethod
    def _one_number_for_both_axes(cls, value: object) -> object:
        """``sigma_init: 1.5`` means ``(1.5, 1.5)`` (what a one-dimensional sweep samples)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (value, value)
        return value

    @field_validator("sigma_init")
    @classmethod
    def _positive_sigma(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError("sigma_init must be > 0 in both x and y")
        return value


class LossConfig(_Strict):
    pos_weight: float = 0.25
    neg_weight: float = 0.75
    center_weight: float = 0.75
    giou_weight: float = 5.0
    """The factor of ``1 - GIoU`` inside ``exp(-reg_loss)``."""
    confidence_weighting: bool = True
    """Ablation switch: ``false`` drops the ``exp(3 * p_pos)`` factor from the positive
    weights, leaving ``w = prior`` (see :func:`autoassign.model.loss.autoassign_loss`)."""


class InferenceConfig(_Strict):
    score_threshold: float = 0.05
    """Applied to the class probability alone, before multiplying by objectness."""
    pre_nms_top_k: int = 1000
    """Per FPN level, on the class probability alone."""
    nms_iou: float = 0.6
    max_detections: int = 100


class InputConfig(_Strict):
    """Resize keeping aspect ratio: short side ``min_size``, long side at most ``max_size``."""

    min_size: int = Field(800, gt=0)
    max_size: int = Field(1333, gt=0)
    size_divisor: int = Field(32, gt=0)


class ModelConfig(_Strict):
    kind: Literal["autoassign", "fcos"] = "autoassign"
    """Which detector: ``autoassign``, or ``fcos``, the baseline it is measured against
    (torchvision's FCOS head, center-sampling assignment and losses on this backbone and FPN,
    see :mod:`autoassign.model.fcos`). FCOS uses ``backbone``, ``fpn_channels``,
    ``head.num_convs``, ``inference``, ``input`` and ``checkpoint``; it ignores
    ``center_prior``, ``loss``, ``head.prior_prob`` and ``head.reg_bias_init``."""
    num_classes: int = Field(80, gt=0)
    backbone: BackboneConfig = BackboneConfig()
    fpn_channels: int = Field(256, gt=0)
    head: HeadConfig = HeadConfig()
    center_prior: CenterPriorConfig = CenterPriorConfig()
    loss: LossConfig = LossConfig()
    inference: InferenceConfig = InferenceConfig()
    input: InputConfig = InputConfig()
    checkpoint: Path | None = None
    """Whole-detector weights to start from: our checkpoint or the reference's
    (mmdetection naming, converted on load)."""

    @model_validator(mode="after")
    def _gn_groups(self) -> ModelConfig:
        if self.fpn_channels % 32 != 0 and self.head.num_convs > 0:
            raise ValueError("fpn_channels must be a multiple of 32 (GroupNorm(32) in the head)")
        return self


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class SplitPathsConfig(_Strict):
    """Overrides of where one split's files are, relative to ``root`` or absolute."""

    annotations: Path | None = None
    images: Path | None = None


class DataConfig(_Strict):
    format: Literal["coco", "voc", "objects365", "widerface"] = "coco"
    root: Path = Path("data/synthetic_coco")
    classes: list[str] | None = None
    """The class names in label order, for your own VOC, COCO or Objects365 data: VOC
    ``<name>`` s and COCO category ``name`` s are matched against it, annotations of any other
    class are left out of training and evaluation, and every per-class output uses these
    names. None: the 20 VOC classes, or every category of the json."""
    train_split: str = "train"
    val_split: str = "val"
    paths: dict[str, SplitPathsConfig] = Field(default_factory=dict)
    """Per split name, where its annotations and images are when not in the default layout."""
    extra_train_roots: list[Path] = Field(default_factory=list)
    """More roots whose ``train_split`` is added to training (VOC 07+12: the VOC2012 root)."""
    objects365_version: Literal[1, 2] = 2
    skip_empty_train_images: bool = True
    synthesize_if_missing: bool = False
    """Write a synthetic dataset in ``format`` at ``root`` when the root does not exist."""
    batch_size: int = Field(2, gt=0)
    """Images per process (per data-parallel worker)."""
    num_workers: int = Field(2, ge=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    aspect_ratio_grouping: bool = True

    @field_validator("classes")
    @classmethod
    def _class_names(cls, classes: list[str] | None) -> list[str] | None:
        if classes is None:
            return None
        if not classes:
            raise ValueError("give at least one class name, or leave classes out")
        blank = [i for i, name in enumerate(classes) if not name.strip()]
        if blank:
            raise ValueError(f"class names must not be blank (position {blank[0]})")
        twice = sorted({name for name in classes if classes.count(name) > 1})
        if twice:
            raise ValueError(f"class names listed twice: {', '.join(twice)}")
        return classes

    @model_validator(mode="after")
    def _classes_of_format(self) -> DataConfig:
        if self.classes is not None and self.format == "widerface":
            raise ValueError("classes applies to voc, coco and objects365 (WiderFace has one)")
        return self


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

NAMED_SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "1x": (12, (8, 11)),
    "13e": (13, (9, 12)),
}
"""Schedule name -> (epochs, epochs after which the learning rate is multiplied by gamma)."""


class TrainConfig(_Strict):
    lr: float = Field(0.01, gt=0)
    """Learning rate for a total batch of ``base_batch_size`` images; scaled linearly."""
    base_batch_size: int = Field(16, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    norm_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of normalisation parameters (GroupNorm/BatchNorm affine); 0 = excluded."""
    prior_lr_mult: float = Field(1.0, gt=0)
    """Learning-rate factor of the center prior's ``mean`` and ``sigma`` (the reference: 1).
    Their gradients are of the order of 1e-3, so a short schedule barely moves them."""
    warmup_iters: int = Field(1000, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    schedule: str | None = "1x"
    """A named schedule ("1x", "13e"), or None to use ``epochs`` and ``milestones``."""
    epochs: int | None = Field(None, gt=0)
    milestones: list[int] | None = None
    gamma: float = Field(0.1, gt=0)
    max_iters_per_epoch: int | None = Field(None, gt=0)
    """Cut every epoch short (quick checks); None = the whole dataset."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Autocast on CUDA only; ignored on the CPU."""
    channels_last: bool = False
    grad_clip_norm: float | None = Field(None, gt=0)
    on_nonfinite_loss: Literal["error", "skip"] = "error"
    checkpoint_every_epochs: int = Field(1, gt=0)
    log_every_iters: int = Field(20, gt=0)

    @model_validator(mode="after")
    def _schedule_resolves(self) -> TrainConfig:
        if self.schedule is not None:
            if self.schedule not in NAMED_SCHEDULES:
                names = ", ".join(sorted(NAMED_SCHEDULES))
                raise ValueError(f"unknown schedule {self.schedule!r}; known: {names}, or null")
            if self.epochs is not None or self.milestones is not None:
                raise ValueError(
                    "epochs and milestones are used only with schedule: null "
                    f"(schedule is {self.schedule!r})"
                )
        elif self.epochs is None or self.milestones is None:
            raise ValueError("with schedule: null, give both epochs and milestones")
        return self

    def resolved_schedule(self) -> tuple[int, list[int]]:
        """(epochs, milestones): the named schedule unless explicit epochs/milestones are set."""
        if self.schedule is None:
            assert self.epochs is not None and self.milestones is not None
            return self.epochs, list(self.milestones)
        epochs, milestones = NAMED_SCHEDULES[self.schedule]
        return epochs, list(milestones)


class EvalConfig(_Strict):
    every_epochs: int = Field(1, ge=0)
    """Evaluate after every N epochs (and always after the last); 0 = only after the last."""
    voc_metric: Literal["11pt", "area"] = "11pt"
    """Which VOC AP is reported as ``mAP``."""
    widerface_ground_truth: Path | None = None
    """Folder with the official ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat``;
    default ``<root>/ground_truth``."""
    batch_size: int = Field(2, gt=0)


class ExperimentConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0
    output_dir: Path = Path("runs/default")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_class_count(self) -> ExperimentConfig:
        classes = self.data.classes
        if classes is not None and len(classes) != self.model.num_classes:
            raise ValueError(
                f"model.num_classes is {self.model.num_classes} but data.classes lists "
                f"{len(classes)} names; make them agree"
            )
        return self
