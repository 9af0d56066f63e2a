"""The Flower glue: the ServerApp and ClientApp, their task handlers and the wire format."""
