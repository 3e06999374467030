"""Running a sweep: the command line, where things go, the parent run, the Ray Tune run and its
trials' drivers and Ray Train workers, the storage, the sweep's record, and what the
terminal shows."""
