"""fedpeft's Flower ServerApp (thin glue over fedpeft.federation)."""
