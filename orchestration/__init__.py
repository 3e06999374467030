"""The platform around the ``autoassign`` library: Ray Train workers, Ray Tune sweeps, MLflow
tracking and S3 storage. ``autoassign`` never imports this package."""
