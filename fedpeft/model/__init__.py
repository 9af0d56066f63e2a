"""The frozen base and its adapters: loading, quantization, fingerprint, placement, precision, memory, merge."""
