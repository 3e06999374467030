"""The learned center priors per class and seed: ``python -m orchestration.prior_shift``
(:mod:`orchestration.results.prior_shift`)."""

import sys

from orchestration.results.prior_shift import main

if __name__ == "__main__":
    sys.exit(main())
