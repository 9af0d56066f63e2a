"""SecAgg+ (Bell et al., CCS 2020; on Bonawitz et al., CCS 2017): the server learns only the sum of the
clients' quantized, masked updates. Primitives from `cryptography` only.

By side: `protocol` has the stages and the client's state machine, `server_protocol` the server's (both
transport-free); `client_stages` and `server_stages` carry them in Flower messages (a federation round under SecAgg+ is
fedpeft.federation.secure_round). Shared: `shamir`, `crypto`, `quantize`, `graph`, `records`."""
