"""SecAgg+ (Bell et al., CCS 2020; on Bonawitz et al., CCS 2017): the server learns only the sum of the
clients' quantized, masked updates. Primitives from `cryptography` only; see docs in README.md."""
