"""What runs on a device: the per-process base and task handlers, and the resident worker."""
