"""``python -m orchestration`` is ``python -m orchestration.sweep``."""

import sys

from orchestration.sweep import main

sys.exit(main())
