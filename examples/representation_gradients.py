"""Multi-task methods on the gradients of a shared representation (MGDA-UB).

A shared encoder z = tanh(x W1 + b1) and K = 3 linear regression heads are
trained with ``mtl_optax.representation.rep_grad``: each step computes the K
gradients dL_k/dz, combines them with the method (MGDA-UB, or the plain mean
for comparison) and back-propagates the result through the encoder once.

Run (about 7 s on 2 CPU cores, most of it compilation):

    python examples/representation_gradients.py              # 300 steps per method
    python examples/representation_gradients.py --steps 50 --seed 1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax

K, N, DIN, D = 3, 256, 8, 16


def encoder(p, x, y):
    del y
    return jnp.tanh(x @ p["w"] + p["b"])


def heads(h, z, x, y):
    del x
    pred = z @ h["w"] + h["b"]  # [N, K]
    return jnp.mean((pred - y) ** 2, axis=0)  # the K task losses


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, DIN))
    # Three related tasks at very different scales: the mean is dominated by task 2.
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2], 10.0 * np.cos(x[:, 3])], axis=1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def train(method, steps=300, seed=0):
    x, y = data()
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {
        "encoder": {"w": 0.3 * jax.random.normal(keys[0], (DIN, D)), "b": jnp.zeros(D)},
        "heads": {"w": 0.3 * jax.random.normal(keys[1], (D, K)), "b": jnp.zeros(K)},
    }
    rg = mtl_optax.rep_grad(method, encoder, heads)
    opt = optax.adam(1e-2)
    state, opt_state = rg.init(params["encoder"], x, y), opt.init(params)

    @jax.jit
    def step(params, opt_state, state):
        losses, grads, state = rg.step(state, params["encoder"], params["heads"], x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, losses

    for _ in range(steps):
        params, opt_state, state, losses = step(params, opt_state, state)
    return losses, state


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial parameters")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1; found {args.steps}.")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for name, method in [
        ("mean", mtl_optax.mean()),
        ("mgda_ub (l2)", mtl_optax.mgda_ub("l2", num_tasks=K)),
        ("mgda_ub (loss+)", mtl_optax.mgda_ub("loss+", num_tasks=K)),
    ]:
        losses, state = train(method, steps=args.steps, seed=args.seed)
        line = "  ".join(f"L{k}={float(v):.4f}" for k, v in enumerate(losses))
        extra = ""
        if hasattr(state.method, "weights"):
            extra = "  last weights " + np.array2string(
                np.asarray(state.method.weights), precision=3
            )
        print(f"{name:16s} {line}{extra}")


if __name__ == "__main__":
    main()
