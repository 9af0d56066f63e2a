"""Personal adapters that never leave the device: the store and the personalization methods."""
