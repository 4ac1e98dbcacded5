"""FCR fine-tuning (feature consistency regularization) for diffusers UNets on accelerate."""

__version__ = "0.1.0"
