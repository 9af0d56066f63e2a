"""fedpeft's Flower ServerApp for `flwr run` and a SuperLink: a re-export of fedpeft.flower.server_app."""
