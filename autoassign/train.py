"""Train one detector: ``python -m autoassign.train CONFIG [key.path=value ...] [--resume [PATH]]``.

Reads the YAML config (overrides as dot paths, values parsed as YAML), then trains with the
one training engine, evaluating each epoch, writing checkpoints, ``metrics.jsonl``,
``final_metrics.json``, ``config.yaml`` and ``center_prior.png`` under ``output_dir``.

Exit status: 0 done, 2 bad config or command line, 1 bad data or a failed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from autoassign.errors import run_cli

RESUME_LAST = "last"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autoassign.train",
        description="Train an AutoAssign detector from a YAML experiment config.",
    )
    parser.add_argument("config", type=Path, help="experiment config (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, e.g. train.lr=0.005 data.batch_size=4",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=RESUME_LAST,
        default=None,
        metavar="PATH",
        help="continue from a checkpoint directory or file (default: OUTPUT_DIR/checkpoints/last)",
    )
    args = parser.parse_intermixed_args(argv)
    # "--resume key=value" : argparse took an override as the resume path.
    resume = args.resume
    if resume not in (None, RESUME_LAST) and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)
        args.resume = RESUME_LAST
    return args


def run(args: argparse.Namespace) -> dict[str, float]:
    from autoassign.config_loading import load_experiment_config
    from autoassign.errors import CheckpointError

    config = load_experiment_config(args.config, args.overrides)
    from autoassign.engine import Trainer  # torch is imported only once the config is valid

    resume_from = None
    if args.resume == RESUME_LAST:
        from autoassign.engine.checkpoint import CHECKPOINT_FILE, LAST_DIR

        resume_from = config.output_dir / "checkpoints" / LAST_DIR
        if not (resume_from / CHECKPOINT_FILE).is_file():
            raise CheckpointError(f"--resume: no checkpoint at {resume_from} to continue from")
    elif args.resume is not None:
        resume_from = Path(args.resume)
    trainer = Trainer(config)
    metrics = trainer.fit(resume_from=resume_from)
    print(f"final evaluation ({config.output_dir / 'final_metrics.json'}):")
    print(json.dumps(metrics, indent=2))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
