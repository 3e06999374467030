"""Sweeps as Ray Jobs, and schedules: ``python -m orchestration.jobs submit | status | logs | stop
| list | schedule | history`` (:mod:`orchestration.cluster.cli`)."""

import sys

from orchestration.common.ray_token import use_a_found_token

use_a_found_token()  # before anything imports Ray, which reads RAY_AUTH_MODE only then
from orchestration.cluster.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
