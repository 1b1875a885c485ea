"""slr_zoo: a component zoo for Stable Latent Reasoning (looped language models)."""

__version__ = "0.1.0"
