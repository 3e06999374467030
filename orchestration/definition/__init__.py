"""What a sweep is: its config file and checks, its search space and TPE searcher, its per-
dataset schedulers, its datasets' scans, and the names of its trials. Imports nothing else
of the platform."""
