"""RotoGrad on a small Flax NNX multi-task regression, beside ``mtl_optax.mean()``.

What it shows
-------------
``K = 3`` synthetic regression tasks share one nonlinear feature of the inputs
but their targets are on different scales (x1, x5, x0.2). A shared MLP
backbone produces an 8-dimensional representation; each task has a linear
head. Two copies of the same initial model are trained with Adam:

* ``mean``: the task gradients are averaged (``mtl_optax.mean()``)::

      losses, grads = mtl_optax.task_grads(loss_fn, model, x, y)
      optimizer.update(model, grads, value=losses)

* ``rotograd``: one learned rotation per task between the backbone and the
  heads (:class:`mtl_optax.rotograd.RotoGrad`), trained by its own Adam; the
  backbone receives RotoGrad's combination of the ``K`` gradients w.r.t. the
  shared representation (one VJP through the backbone)::

      losses, g_backbone, g_heads, g_roto = roto.value_and_grad(
          backbone, heads, heads_loss, x, y)

The table reports each task's test MSE divided by that task's target variance
(1.0 = predicting the mean), so the columns are comparable.

How to run
----------
::

    python examples/rotograd_example.py            # 400 steps, < 60 s on 2 CPU cores
    python examples/rotograd_example.py --steps 50
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mtl_optax
from mtl_optax import rotograd as rg

K = 3
D_IN, D_HIDDEN, D_REP = 6, 32, 8
SCALES = jnp.array([1.0, 5.0, 0.2])


def make_data(key: jax.Array, w: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[n, D_IN]`` and targets ``[n, K]``: a shared feature, per-task parts."""
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, D_IN))
    shared = jnp.sin(x @ w[:, :1])
    own = jnp.tanh(x @ w[:, 1:])
    y = (shared + own) * SCALES + 0.05 * jax.random.normal(kn, (n, K))
    return x, y


class Backbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(D_HIDDEN, D_REP, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.l2(nnx.relu(self.l1(x))))


class Heads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(D_REP, 1, rngs=rngs) for _ in range(K)])

    def __call__(self, zs: jax.Array) -> jax.Array:
        """``[K, n]`` predictions from ``[K, n, D_REP]`` representations."""
        return jnp.stack([self.layers[k](zs[k])[:, 0] for k in range(K)])


def heads_loss(heads: Heads, zs: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((heads(zs) - y.T) ** 2, axis=1)


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.backbone = Backbone(rngs)
        self.heads = Heads(rngs)


def _metrics(model: Model, zs: jax.Array, y: jax.Array) -> list[float]:
    mse = jnp.mean((model.heads(zs) - y.T) ** 2, axis=1) / jnp.var(y, axis=0)
    return [float(v) for v in mse]


def main(steps: int = 400, verbose: bool = True, seed: int = 0) -> dict[str, list[float]]:
    """Trains both models for ``steps`` steps; returns the per-task relative test MSE."""
    key_w, key_train, key_test = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(key_w, (D_IN, K + 1)) / jnp.sqrt(D_IN)  # the task definitions
    x_train, y_train = make_data(key_train, w, 512)
    x_test, y_test = make_data(key_test, w, 512)
    batch = 64

    # --- mean of the task gradients -------------------------------------------
    mean_model = Model(nnx.Rngs(seed))
    mean_opt = nnx.Optimizer(
        mean_model, optax.chain(mtl_optax.mean(), optax.adam(1e-2)), wrt=nnx.Param
    )

    def task_losses(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
        z = model.backbone(x)
        return heads_loss(model.heads, jnp.broadcast_to(z, (K, *z.shape)), y)

    @nnx.jit
    def mean_step(model: Model, opt: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        losses, grads = mtl_optax.task_grads(task_losses, model, x, y)
        opt.update(model, grads, value=losses)
        return losses

    # --- RotoGrad ---------------------------------------------------------------
    roto_model = Model(nnx.Rngs(seed))  # the same initial weights
    roto = rg.RotoGrad(K, D_REP, burn_in_period=20, rngs=nnx.Rngs(seed + 1))
    model_opt = nnx.Optimizer(roto_model, optax.adam(1e-2), wrt=nnx.Param)
    roto_opt = nnx.Optimizer(roto, optax.adam(1e-2), wrt=nnx.Param)  # its own learning rate

    @nnx.jit
    def roto_step(
        model: Model,
        roto: rg.RotoGrad,
        model_opt: nnx.Optimizer,
        roto_opt: nnx.Optimizer,
        x: jax.Array,
        y: jax.Array,
    ) -> jax.Array:
        losses, g_backbone, g_heads, g_roto = roto.value_and_grad(
            model.backbone, model.heads, heads_loss, x, y
        )
        model_opt.update(model, nnx.State({"backbone": g_backbone, "heads": g_heads}))
        roto_opt.update(roto, g_roto)
        return losses

    steps_iter = range(steps)
    if verbose:
        try:
            from tqdm import tqdm

            steps_iter = tqdm(steps_iter, desc="training", leave=False)
        except ImportError:
            pass
    for step in steps_iter:
        lo = (step * batch) % (x_train.shape[0] - batch + 1)
        x, y = x_train[lo : lo + batch], y_train[lo : lo + batch]
        mean_step(mean_model, mean_opt, x, y)
        roto_step(roto_model, roto, model_opt, roto_opt, x, y)

    z = mean_model.backbone(x_test)
    results = {"mean": _metrics(mean_model, jnp.broadcast_to(z, (K, *z.shape)), y_test)}
    results["rotograd"] = _metrics(roto_model, roto(roto_model.backbone(x_test)), y_test)
    if verbose:
        print(f"test MSE / target variance after {steps} steps (lower is better)")
        print(f"{'method':<10}" + "".join(f"  task{k} (x{float(SCALES[k]):g})" for k in range(K)))
        for name, values in results.items():
            print(f"{name:<10}" + "".join(f"  {v:>13.4f}" for v in values))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    main(steps=parser.parse_args().steps)
