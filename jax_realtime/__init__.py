"""jax-realtime: Whisper in JAX/Flax, compiled for fixed shapes, batched and sharded."""

__version__ = "0.1.0"
