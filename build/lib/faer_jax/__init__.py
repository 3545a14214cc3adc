"""faer_jax: FAER (ConvNeXt + Contextual Channel Attention) in JAX."""

__version__ = "0.1.0"
