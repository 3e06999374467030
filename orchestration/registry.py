"""The registered models: ``python -m orchestration.registry list | show | load``
(:mod:`orchestration.tracking.registry`)."""

import sys

from orchestration.tracking.registry import main

if __name__ == "__main__":
    sys.exit(main())
