"""The config tree: every option written once, and what follows from it (flags, TOML files, Flower's run config)."""
