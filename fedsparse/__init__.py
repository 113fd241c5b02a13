"""fedsparse: federated Independent Subnet Training on sparse (masked) MAE ViT features."""

__version__ = "0.1.0"
