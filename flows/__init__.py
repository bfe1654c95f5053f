"""Prefect flows. `flows.pipeline:apt` is the flow behind `apt/full-pipeline` and `apt/retrain`."""
