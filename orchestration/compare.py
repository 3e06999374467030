"""Compare a sweep's trials from MLflow alone: ``python -m orchestration.compare``
(:mod:`orchestration.results.compare`)."""

import sys

from orchestration.results.compare import main

if __name__ == "__main__":
    sys.exit(main())
