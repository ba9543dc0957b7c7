"""Parity tests of mtl_optax against its PyTorch reference implementations."""
