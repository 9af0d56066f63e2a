"""The Flower ClientApp that `[tool.flwr.app.components]` names; it lives in fedpeft.flower.client_app."""

from fedpeft.flower.client_app import app

__all__ = ["app"]
