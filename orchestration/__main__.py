"""``python -m orchestration`` is ``python -m orchestration.sweep``."""

import sys

from orchestration.running.cli import main

sys.exit(main())
