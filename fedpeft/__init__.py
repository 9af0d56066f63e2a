"""fedpeft: federated, on-device LoRA/IA3 adapter fine-tuning on a shared, quantized, frozen base model."""

__version__ = "0.1.0"
