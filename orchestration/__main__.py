"""``python -m orchestration`` is ``python -m orchestration.sweep``."""

import sys

from orchestration.common.ray_token import use_a_found_token

use_a_found_token()  # before anything imports Ray, which reads RAY_AUTH_MODE only then
from orchestration.running.cli import main  # noqa: E402

sys.exit(main())
