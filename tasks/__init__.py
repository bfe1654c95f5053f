"""Prefect tasks: thin wrappers of the `apt_model` library. Each returns a small JSON manifest (paths, hashes,
metrics), never tensors, so results are cheap to pass between stages and to show in the UI."""
