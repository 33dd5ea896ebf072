"""vistax: pretraining of vision and multimodal transformers in JAX/Flax, from config files."""

__version__ = "0.1.0"
