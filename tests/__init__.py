"""mtl_optax test suite."""
