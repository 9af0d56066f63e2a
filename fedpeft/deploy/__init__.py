"""Deployment over real Flower processes: certificates, `fedpeft server`, `fedpeft client`, local runs."""
