"""Run a sweep: ``python -m orchestration.sweep CONFIG [key=value ...] [--dry-run | --resume]``
(:mod:`orchestration.running.cli`)."""

import sys

from orchestration.running.cli import main

if __name__ == "__main__":
    sys.exit(main())
