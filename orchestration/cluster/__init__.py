"""Sweeps on a Ray cluster: Ray Jobs submission and the jobs command, the schedules file, the
cron scheduler and its history."""
