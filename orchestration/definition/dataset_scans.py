"""The sweep's datasets before any trial starts: written when synthetic, scanned when real.

Every dataset gets the library's fast scan (annotations plus image headers) on its train
split before Ray starts, so a broken file stops the sweep in seconds with the file and line,
not an hour later inside a worker. The class count the config declares is checked against
the dataset's.
"""

from __future__ import annotations

from pathlib import Path

from autoassign.config import DataConfig
from autoassign.data.errors import DatasetError
from autoassign.errors import ConfigError
from orchestration.definition.sweep_config import DatasetConfig, SweepConfig


def data_config(dataset: DatasetConfig) -> DataConfig:
    return DataConfig(
        format=dataset.format,
        root=dataset.root,
        train_split=dataset.train_split,
        val_split=dataset.val_split,
        classes=dataset.classes,
    )


def write_synthetic_if_missing(dataset: DatasetConfig) -> bool:
    """Write the embedded set at ``dataset.root`` if it is synthetic and missing; True if so
    (renamed into place when complete, so nobody reads half a dataset)."""
    options = dataset.synthetic_options
    if options is None:
        return False
    from autoassign.data.synthetic import write_synthetic_root

    return write_synthetic_root(
        dataset.format,
        dataset.root,
        num_images=options.images,
        num_classes=options.num_classes,
        image_size=options.image_size,
        seed=options.seed,
        splits=tuple(dict.fromkeys((dataset.train_split, dataset.val_split))),
    )


def scan_all(
    sweep: SweepConfig, *, write_synthetic: bool, source: str | None = None
) -> dict[str, str]:
    """Scan every dataset's train split; one line of summary per dataset name.

    ``source`` (the sweep file) starts every error message, as the config's own errors do.

    Raises:
        DatasetError: a dataset has errors (the scan's report says which file and line).
        ConfigError: ``num_classes`` differs from the dataset's class count.
    """
    summaries: dict[str, str] = {}
    for index, dataset in enumerate(sweep.datasets):
        if write_synthetic:
            write_synthetic_if_missing(dataset)
        if not Path(dataset.root).exists():
            summaries[dataset.name] = f"synthetic, written at {dataset.root} when the sweep runs"
            continue
        summaries[dataset.name] = scan_one(dataset, index, source=source)
    return summaries


def scan_one(dataset: DatasetConfig, index: int, *, source: str | None = None) -> str:
    from autoassign.data.validate import scan_dataset

    prefix = f"{source}: " if source else ""
    report = scan_dataset(data_config(dataset), dataset.train_split)
    if not report.ok:
        raise DatasetError(
            f"{prefix}dataset {dataset.name!r} (datasets.{index}) has problems; "
            f"nothing started:\n{report.summary()}"
        )
    classes = len(report.boxes_per_class)
    if classes and classes != dataset.num_classes:
        raise ConfigError(
            f"{prefix}datasets.{index}.num_classes: {dataset.num_classes}, but the "
            f"{dataset.format} dataset at {dataset.root} has {classes} classes"
        )
    summary = (
        f"{report.num_images} train images, {report.num_boxes} boxes, "
        f"{len(report.warnings)} warning(s)"
    )
    for what, rules in (
        ("annotations", report.filtered_annotations),
        ("images", report.filtered_images),
    ):
        counts = {rule: len(ids) for rule, ids in rules.items() if ids}
        if counts:
            listed = ", ".join(f"{rule} {count}" for rule, count in counts.items())
            summary += f"; training leaves out {sum(counts.values())} {what} ({listed})"
    if report.left_out_classes:
        listed = ", ".join(f"{name} {n}" for name, n in report.left_out_classes.items())
        left_out = sum(report.left_out_classes.values())
        summary += f"; training leaves out {left_out} annotations of unlisted classes ({listed})"
    return summary
