"""MLflow: the tracker (runs, tags, retries through an outage, buffered metrics), each trial's
logging, closing runs Tune ended, the MLflow model of a checkpoint, and the registry."""
