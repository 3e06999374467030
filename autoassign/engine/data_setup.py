"""Getting the datasets ready before training: synthesize when asked, scan, read both splits.

The scan of the train split reads every image header, so a passed scan is recorded in a small
JSON file (the trainer's ``output_dir / "dataset_scan.json"``) and reused by later fits of the
same run (a restarted trial) while the dataset is unchanged. "Unchanged" is judged by a
fingerprint of the size and modification time of every file under the split's roots (and of
the annotation / image paths the config points at outside them): cheap next to the scan, and
any file added, removed, rewritten or touched makes the next fit scan again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from autoassign import distributed as dist_utils
from autoassign.config import DataConfig
from autoassign.data.errors import DatasetError
from autoassign.data.records import DetectionDataset

logger = logging.getLogger(__name__)

SCAN_RECORD_VERSION = 1


def synthesize_if_missing(data_cfg: DataConfig) -> None:
    """Write the synthetic dataset at ``data_cfg.root`` when asked and the root is missing.

    Rank 0 writes (the data package stages and renames, so nobody sees half a dataset); the
    other ranks wait for it.
    """
    from autoassign.data import ensure_dataset

    if dist_utils.is_main_process():
        ensure_dataset(data_cfg)
    dist_utils.barrier()


def scanned_paths(data_cfg: DataConfig, split: str) -> list[Path]:
    """The roots a scan of ``split`` reads, and the configured paths of the split outside them."""
    roots = [Path(data_cfg.root)]
    if split == data_cfg.train_split:
        roots += [Path(root) for root in data_cfg.extra_train_roots]
    overrides = data_cfg.paths.get(split)
    if overrides is not None:
        for path in (overrides.annotations, overrides.images):
            if path is not None and Path(path).is_absolute():
                roots.append(Path(path))
    return roots


def dataset_fingerprint(data_cfg: DataConfig, split: str) -> str:
    """A hash of the relative path, size and mtime (ns) of every file the scan may read."""
    digest = hashlib.sha256()
    for root in scanned_paths(data_cfg, split):
        digest.update(f"root {root}\n".encode())
        files = [root] if root.is_file() else sorted(_files_under(root))
        for path in files:
            stat = path.stat()
            relative = path.relative_to(root) if path != root else Path(".")
            digest.update(f"{relative.as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, _, names in os.walk(root, followlinks=True):
        found.extend(Path(folder, name) for name in names)
    return found


def _scan_identity(data_cfg: DataConfig, split: str) -> dict:
    """What a scan record must match to be reused (the fingerprint is the costly part)."""
    return {
        "version": SCAN_RECORD_VERSION,
        "format": data_cfg.format,
        "root": str(data_cfg.root),
        "split": split,
        "data": data_cfg.model_dump(
            mode="json", include={"extra_train_roots", "paths", "objects365_version"}
        ),
        "fingerprint": dataset_fingerprint(data_cfg, split),
    }


def _read_scan_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _scan_problems(data_cfg: DataConfig, scan_record: Path | None) -> str | None:
    """Rank 0's part: reuse a matching record or scan; the report's summary on errors."""
    from autoassign.data import validate

    split = data_cfg.train_split
    identity = _scan_identity(data_cfg, split) if scan_record is not None else None
    if identity is not None and _read_scan_record(scan_record) == identity:
        logger.info("dataset scan reused from %s", scan_record)
        return None
    report = validate.scan_dataset(data_cfg, split)
    if not report.ok:
        return report.summary()
    if identity is not None:
        scan_record.parent.mkdir(parents=True, exist_ok=True)
        tmp = scan_record.with_name(f".{scan_record.name}.tmp")
        tmp.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, scan_record)
    return None


def check_train_split(data_cfg: DataConfig, scan_record: Path | None = None) -> None:
    """Scan the train split; raise :class:`DatasetError` with the scan's report on errors.

    Rank 0 scans (it reads every image header); the verdict is shared with the other ranks,
    so every rank stops, with the same message. With ``scan_record``, a passed scan is
    recorded there and a later call skips the scan while the record matches the config and
    the dataset's fingerprint (see the module docstring).
    """
    problems = None
    if dist_utils.is_main_process():
        problems = _scan_problems(data_cfg, scan_record)
    problems = dist_utils.broadcast_object(problems)
    if problems is not None:
        raise DatasetError(
            f"the {data_cfg.format} dataset at {data_cfg.root} has problems; training not "
            f"started:\n{problems}"
        )


def prepare_datasets(
    data_cfg: DataConfig, *, scan_record: Path | None = None
) -> tuple[DetectionDataset, DetectionDataset]:
    """Synthesize if asked, scan the train split (or reuse ``scan_record``, see
    :func:`check_train_split`), then read the train and val splits."""
    from autoassign.data import build_dataset

    synthesize_if_missing(data_cfg)
    check_train_split(data_cfg, scan_record)
    return build_dataset(data_cfg, data_cfg.train_split), build_dataset(
        data_cfg, data_cfg.val_split
    )
