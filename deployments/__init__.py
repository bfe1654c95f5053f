"""Work-pool definitions and the local Prefect stack (`python -m deployments.local_stack up|down`)."""
