"""The Flower ServerApp that `[tool.flwr.app.components]` names; it lives in fedpeft.flower.server_app."""

from fedpeft.flower.server_app import app

__all__ = ["app"]
