"""Getting the datasets ready before training: synthesize when asked, scan, read both splits."""

from __future__ import annotations

from autoassign.config import DataConfig
from autoassign.data.records import DetectionDataset
from autoassign.engine import distributed as dist_utils
from autoassign.errors import DatasetError


def synthesize_if_missing(data_cfg: DataConfig) -> None:
    """Write the synthetic dataset at ``data_cfg.root`` when asked and the root is missing.

    Rank 0 writes (the data package stages and renames, so nobody sees half a dataset); the
    other ranks wait for it.
    """
    from autoassign.data import ensure_dataset

    if dist_utils.is_main_process():
        ensure_dataset(data_cfg)
    dist_utils.barrier()


def check_train_split(data_cfg: DataConfig) -> None:
    """Scan the train split; raise :class:`DatasetError` with the scan's report on errors.

    Rank 0 scans (it reads every image header); the verdict is shared with the other ranks,
    so every rank stops, with the same message.
    """
    problems = None
    if dist_utils.is_main_process():
        from autoassign.data.validate import scan_dataset

        report = scan_dataset(data_cfg, data_cfg.train_split)
        if not report.ok:
            problems = report.summary()
    problems = dist_utils.broadcast_object(problems)
    if problems is not None:
        raise DatasetError(
            f"the {data_cfg.format} dataset at {data_cfg.root} has problems; training not "
            f"started:\n{problems}"
        )


def prepare_datasets(data_cfg: DataConfig) -> tuple[DetectionDataset, DetectionDataset]:
    """Synthesize if asked, scan the train split, then read the train and val splits."""
    from autoassign.data import build_dataset

    synthesize_if_missing(data_cfg)
    check_train_split(data_cfg)
    return build_dataset(data_cfg, data_cfg.train_split), build_dataset(
        data_cfg, data_cfg.val_split
    )
