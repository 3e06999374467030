"""Sweeps as Ray Jobs, and schedules: ``python -m orchestration.jobs submit | status | logs | stop
| list | schedule | history`` (:mod:`orchestration.cluster.cli`)."""

import sys

from orchestration.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
