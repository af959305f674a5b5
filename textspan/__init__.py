"""textspan: explain the attention heads of CLIP vision transformers in words."""

__version__ = "0.1.0"
