"""Local training and evaluation on one device, task metrics, and the `train`/`eval` commands."""
