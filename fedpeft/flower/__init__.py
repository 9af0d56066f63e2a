"""The Flower glue: the ServerApp, the ClientApp (forwarding to fedpeft.device.tasks) and the grid."""
