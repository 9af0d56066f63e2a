"""fedpeft's Flower ClientApp for `flwr run` and a SuperNode: a re-export of fedpeft.flower.client_app."""
