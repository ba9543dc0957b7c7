"""Hyperparameters that the registered methods need to be built in generic tests.

A method whose factory has required arguments gets them here; every other method
is built with its defaults. Keyed by registry name.
"""

import numpy as np


def hparams(name: str, num_tasks: int) -> dict:
    """The keyword arguments that build method ``name`` for ``num_tasks`` tasks."""
    extra = {
        "constant": {"weights": np.linspace(0.5, 1.5, num_tasks).tolist()},
    }.get(name, {})
    return {"num_tasks": num_tasks, **extra}
