"""`fedpeft simulate`: virtual clients on Flower's simulation engine (Ray), in a session of its own."""
