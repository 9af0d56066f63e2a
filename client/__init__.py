"""fedpeft's Flower ClientApp (thin glue over fedpeft.device)."""
