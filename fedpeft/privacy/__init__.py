"""User-level differential privacy for the federation: clipping, the server's Gaussian noise, and the
accountant (Google's dp-accounting). See fedpeft.privacy.accountant and fedpeft.privacy.central."""
