"""The Quart service: transport and protocol only; all speech work is in ``jax_realtime``."""
