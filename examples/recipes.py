"""Train-step recipes: Flax NNX, Flax Linen, hyperparameter schedules, logging weights.

What it shows
-------------
Each recipe is one function, runnable on its own, on the same small two-task
regression (a shared linear-ReLU trunk and two linear heads; task 2's target is
10 times larger than task 1's):

* :func:`nnx_train_step`: a Flax NNX model, ``nnx.Optimizer`` over
  ``optax.chain(method, optax.adam(lr))`` and :func:`mtl_optax.task_grads`.
* :func:`linen_train_step`: the same with Flax Linen (``variables["params"]``)
  and a plain ``jax.jit``-ed step.
* :func:`sdmgrad_stochastic_step`: SDMGrad's stochastic form, where the
  ``[K, K]`` matrix comes from two other mini-batches through the extra
  argument ``cross_gramian=`` of ``update`` (``optax.chain`` forwards it).
* :func:`scheduled_hyperparameter`: a schedule on a method's hyperparameter
  (CAGrad's ``alpha``) with ``optax.inject_hyperparams``.
* :func:`log_weights`: the method's weights of the last step, read from the
  (chained) optimizer state with ``optax.tree_utils.tree_get(state, "weights")``.

Hyperparameter schedules: ``optax.inject_hyperparams(factory, static_args=...)``
rebuilds the method inside the jitted ``update`` with every numeric argument,
defaults included, as a traced ``jax.Array``. The float hyperparameters that
are commonly scheduled accept a traced value (CAGrad's ``alpha``, GradVac's
``beta``, SDMGrad's ``lambda_``; checked in ``tests/test_inject_hyperparams.py``);
list every other numeric argument in ``static_args`` (``num_tasks``, ``key``,
``rescale``, ``max_iter``, ``eps``...). For a hyperparameter that a factory
checks in Python (graddrop's ``leakage``, gradnorm's ``alpha``, constant's
``weights``), :func:`piecewise_constant` is the fallback: the method built once
per value and a ``lax.switch`` on the step count (every branch is compiled, so
keep the number of values small; the state must have the same structure for
every value). :func:`inject_hyperparams_works` tells which case a factory is.

How to run
----------
::

    pip install -e ".[examples]"
    python examples/recipes.py                 # every recipe, 300 steps each
    python examples/recipes.py --steps 50 --method mgda

Measured on 2 shared CPU cores (jax 0.10.2): about 20 s, most of it compilation.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

import mtl_optax

NUM_TASKS = 2
FEATURES, HIDDEN = 4, 16
LEARNING_RATE = 1e-2


def make_batch(key: jax.Array, n: int = 64) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[n, 4]`` and targets ``[n, 2]``: two related tasks on scales 1 and 10."""
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, FEATURES))
    y = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1], 10.0 * (jnp.sin(x[:, 0]) - x[:, 2])], axis=1)
    return x, y + 0.05 * jax.random.normal(kn, y.shape)


def batches(seed: int, steps: int) -> list[tuple[jax.Array, jax.Array]]:
    """``steps`` mini-batches from the generator ``seed``."""
    return [make_batch(k) for k in jax.random.split(jax.random.key(seed), steps)]


# ---------------------------------------------------------------------------
# Recipe 1: Flax NNX.
# ---------------------------------------------------------------------------


class NNXModel(nnx.Module):
    """A shared trunk and one linear head per task (Flax NNX)."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.trunk = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(NUM_TASKS)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.trunk(x))
        return jnp.concatenate([head(h) for head in self.heads], axis=-1)  # [N, K]


def nnx_losses(model: NNXModel, x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``[K]`` per-task mean squared errors."""
    return jnp.mean((model(x) - y) ** 2, axis=0)


@nnx.jit
def _nnx_step(model: NNXModel, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    # task_grads on a module differentiates its nnx.Param variables: grads is an
    # nnx.State whose leaves have a leading task axis K.
    losses, grads = mtl_optax.task_grads(nnx_losses, model, x, y)
    optimizer.update(model, grads, value=losses)  # extra arguments reach the method
    return losses


def nnx_train_step(
    method: optax.GradientTransformationExtraArgs, *, steps: int = 300, seed: int = 0
) -> tuple[NNXModel, nnx.Optimizer, np.ndarray]:
    """Trains :class:`NNXModel` with ``method`` + Adam; returns model, optimizer, losses.

    The method goes first in the chain: it maps the ``K`` task gradients to one
    update, which Adam then treats as an ordinary gradient. ``wrt=nnx.Param``
    makes the optimizer's parameters the module's ``nnx.Param`` variables, the
    ones :func:`mtl_optax.task_grads` differentiates.
    """
    model = NNXModel(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.chain(method, optax.adam(LEARNING_RATE)), wrt=nnx.Param)
    losses = [_nnx_step(model, optimizer, x, y) for x, y in batches(seed, steps)]
    return model, optimizer, np.asarray(jnp.stack(losses))


# ---------------------------------------------------------------------------
# Recipe 2: Flax Linen.
# ---------------------------------------------------------------------------


class LinenModel(nn.Module):
    """The same network in Flax Linen."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(HIDDEN, name="trunk")(x))
        return jnp.concatenate([nn.Dense(1, name=f"head{k}")(h) for k in range(NUM_TASKS)], -1)


class LinenTrainState(NamedTuple):
    """Parameters and optimizer state of :func:`linen_train_step`."""

    params: Any
    opt_state: optax.OptState


def linen_train_step(
    method: optax.GradientTransformationExtraArgs, *, steps: int = 300, seed: int = 0
) -> tuple[LinenTrainState, np.ndarray]:
    """Trains :class:`LinenModel` with ``method`` + Adam; returns the state and losses.

    :func:`mtl_optax.task_grads` takes the loss function of the parameters
    (``variables["params"]``) and returns the ``[K]`` losses and the gradients
    with a leading task axis; the rest is a standard optax loop.
    """
    model = LinenModel()
    x0, _ = make_batch(jax.random.key(seed))
    params = model.init(jax.random.key(seed), x0)["params"]
    opt = optax.chain(method, optax.adam(LEARNING_RATE))

    def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2, axis=0)

    @jax.jit
    def step(state: LinenTrainState, x: jax.Array, y: jax.Array):
        losses, grads = mtl_optax.task_grads(losses_fn, state.params, x, y)
        updates, opt_state = opt.update(grads, state.opt_state, state.params, value=losses)
        return LinenTrainState(optax.apply_updates(state.params, updates), opt_state), losses

    state = LinenTrainState(params, opt.init(params))
    losses = []
    for x, y in batches(seed, steps):
        state, loss = step(state, x, y)
        losses.append(loss)
    return state, np.asarray(jnp.stack(losses))


# ---------------------------------------------------------------------------
# Recipe 3: SDMGrad's stochastic form (an extra argument of update).
# ---------------------------------------------------------------------------


def sdmgrad_stochastic_step(
    *, steps: int = 300, seed: int = 0, lambda_: float = 0.3
) -> tuple[LinenTrainState, np.ndarray]:
    """SDMGrad with :math:`A = J_1 J_2^\\top` from two independent mini-batches.

    ``update`` combines the task gradients of a third batch with weights
    computed from ``cross_gramian=A``; ``optax.chain`` passes the keyword on to
    every transformation (Adam ignores it). Without it, SDMGrad uses the
    Gramian of the gradients it is given (its deterministic form).
    """
    model = LinenModel()
    x0, _ = make_batch(jax.random.key(seed))
    params = model.init(jax.random.key(seed), x0)["params"]
    opt = optax.chain(
        mtl_optax.sdmgrad(lambda_=lambda_, num_tasks=NUM_TASKS), optax.adam(LEARNING_RATE)
    )

    def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2, axis=0)

    @jax.jit
    def step(state: LinenTrainState, key: jax.Array):
        (x1, y1), (x2, y2), (x3, y3) = (make_batch(k) for k in jax.random.split(key, 3))
        _, g1 = mtl_optax.task_grads(losses_fn, state.params, x1, y1)
        _, g2 = mtl_optax.task_grads(losses_fn, state.params, x2, y2)
        losses, g3 = mtl_optax.task_grads(losses_fn, state.params, x3, y3)
        a = mtl_optax.cross_gramian(g1, g2)  # [K, K], unbiased, not symmetric
        updates, opt_state = opt.update(
            g3, state.opt_state, state.params, value=losses, cross_gramian=a
        )
        return LinenTrainState(optax.apply_updates(state.params, updates), opt_state), losses

    state = LinenTrainState(params, opt.init(params))
    losses = []
    for key in jax.random.split(jax.random.key(seed), steps):
        state, loss = step(state, key)
        losses.append(loss)
    return state, np.asarray(jnp.stack(losses))


# ---------------------------------------------------------------------------
# Recipe 4: a schedule on a method's hyperparameter.
# ---------------------------------------------------------------------------


class PiecewiseConstantState(NamedTuple):
    """State of :func:`piecewise_constant`."""

    count: jax.Array  # int32 step count
    index: jax.Array  # int32 index of the value used in the last step (for logging)
    inner_state: Any  # the methods' common state


def piecewise_constant(
    factory: Callable[..., optax.GradientTransformationExtraArgs],
    name: str,
    values: Sequence[float],
    boundaries: Sequence[int],
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """``factory(**{name: values[i]}, **kwargs)`` for the steps in ``[boundaries[i-1], boundaries[i])``.

    .. math::
      h_t = v_i \\quad \\text{for } b_{i-1} \\le t < b_i
      \\quad (b_{-1} = 0,\\ b_{n-1} = \\infty)

    The method is built once per value, and ``update`` picks the one of the
    current step with ``lax.switch`` (so it jits; every branch is compiled).
    All the methods share one state, which must have the same structure and
    dtypes for every value (true for float hyperparameters such as CAGrad's
    ``alpha``, MGDA-UB's, SDMGrad's ``lambda_``).

    Args:
      factory: an mtl_optax method factory, e.g. ``mtl_optax.cagrad``.
      name: the hyperparameter to schedule, e.g. ``"alpha"``.
      values: its ``n`` values, in order.
      boundaries: the ``n - 1`` increasing steps at which the next value starts.
      **kwargs: the factory's other arguments (``num_tasks=`` recommended).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments of
      ``update`` (``value=``, ...) are passed to the method.

    Raises:
      ValueError: ``len(boundaries) != len(values) - 1``, boundaries not
        increasing, or the methods' states differ in structure.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = piecewise_constant(mtl_optax.cagrad, "alpha", [0.0, 0.5], [10], num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update(g, state)
      >>> int(state.index), u["w"]  # alpha = 0 at step 0: the mean
      (0, Array([0.25, 0.5 ], dtype=float32))
    """
    values = list(values)
    boundaries = [int(b) for b in boundaries]
    if len(boundaries) != len(values) - 1:
        raise ValueError(
            f"piecewise_constant: {len(values)} values need {len(values) - 1} boundaries;"
            f" got {len(boundaries)}."
        )
    if any(b1 >= b2 for b1, b2 in itertools.pairwise(boundaries)):
        raise ValueError(f"piecewise_constant: boundaries must increase; got {boundaries}.")
    methods = [factory(**{name: v}, **kwargs) for v in values]
    bounds = jnp.asarray(boundaries, jnp.int32)

    def init_fn(params: Any) -> PiecewiseConstantState:
        states = [m.init(params) for m in methods]
        first = jax.tree_util.tree_structure(states[0])
        for v, s in zip(values, states, strict=True):
            if jax.tree_util.tree_structure(s) != first:
                raise ValueError(
                    f"piecewise_constant: the state of {name}={v!r} has structure"
                    f" {jax.tree_util.tree_structure(s)}; expected {first}."
                )
        return PiecewiseConstantState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), states[0])

    def update_fn(updates, state, params=None, **extra_args):
        index = jnp.searchsorted(bounds, state.count, side="right").astype(jnp.int32)
        branches = [
            functools.partial(lambda m, g, s, p: m.update(g, s, p, **extra_args), m)
            for m in methods
        ]
        updates, inner = lax.switch(index, branches, updates, state.inner_state, params)
        count = optax.safe_increment(state.count)
        return updates, PiecewiseConstantState(count, index, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def inject_hyperparams_works(
    factory: Callable[..., optax.GradientTransformationExtraArgs], **hparams: Any
) -> bool:
    """Whether ``optax.inject_hyperparams(factory)(**hparams)`` runs in a jitted step.

    ``num_tasks`` is passed as a static argument. Returns False (with the
    error printed) when the factory cannot be called with traced arguments.
    """
    tx = optax.inject_hyperparams(factory, static_args=("num_tasks",))(
        num_tasks=NUM_TASKS, **hparams
    )
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]])}
    try:
        jax.jit(tx.update)(grads, tx.init(params), params, value=jnp.ones(NUM_TASKS))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        print(f"inject_hyperparams({factory.__name__}): {type(err).__name__}")
        return False
    except (TypeError, ValueError) as err:
        print(f"inject_hyperparams({factory.__name__}): {type(err).__name__}: {err}")
        return False
    return True


def scheduled_hyperparameter(
    *, steps: int = 300, seed: int = 0
) -> tuple[nnx.Optimizer, list[float]]:
    """CAGrad with ``alpha`` ramped linearly from 0 (the mean) to 0.5.

    ``optax.inject_hyperparams`` evaluates the schedule at the step count and
    rebuilds CAGrad with that ``alpha`` inside the jitted step; the other
    numeric arguments are static. Returns the optimizer and the ``alpha`` of
    every step, read back from the state (``opt_state[0].hyperparams``).
    """
    schedule = optax.linear_schedule(0.0, 0.5, transition_steps=max(steps - 1, 1))
    method = optax.inject_hyperparams(
        mtl_optax.cagrad, static_args=("num_tasks", "rescale", "eps", "norm_eps", "max_iter")
    )(alpha=schedule, num_tasks=NUM_TASKS)
    model = NNXModel(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.chain(method, optax.adam(LEARNING_RATE)), wrt=nnx.Param)
    alphas = []
    for x, y in batches(seed, steps):
        alphas.append(float(schedule(len(alphas))))
        _nnx_step(model, optimizer, x, y)
        used = float(optimizer.opt_state[0].hyperparams["alpha"].get_value())
        assert abs(used - alphas[-1]) < 1e-6, (used, alphas[-1])
    return optimizer, alphas


# ---------------------------------------------------------------------------
# Recipe 5: logging the method's weights.
# ---------------------------------------------------------------------------


def log_weights(opt_state: Any) -> np.ndarray:
    """The ``[K]`` weights of the method's last step, from any optimizer state.

    Every weighting method's state has a field ``weights``. In a chain
    (``optax.chain(method, optax.adam(lr))``) it is ``opt_state[0].weights``;
    ``optax.tree_utils.tree_get`` finds it wherever it is (inside an
    ``nnx.Optimizer``'s ``opt_state``, in :func:`piecewise_constant`'s
    ``inner_state``). When several methods are chained (``mtl_optax.compose``)
    there are several ``weights`` fields and ``tree_get`` raises a
    ``KeyError``: use ``optax.tree_utils.tree_get_all_with_path`` and pick one
    by its path.
    """
    weights = optax.tree_utils.tree_get(opt_state, "weights")
    if weights is None:
        raise KeyError("the optimizer state has no field 'weights'")
    if isinstance(weights, nnx.Variable):  # nnx.Optimizer wraps the state's arrays
        weights = weights.get_value()
    return np.asarray(weights)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each recipe")
    parser.add_argument("--method", type=str, default="pcgrad", help="method of recipes 1-2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and models")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.method not in mtl_optax.available():
        parser.error(f"unknown method {args.method!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every recipe; returns their results by name."""
    args = parse_args(argv)
    method = functools.partial(mtl_optax.get, args.method, num_tasks=NUM_TASKS)
    out: dict[str, Any] = {}
    with tqdm(total=5, desc="recipes", disable=None) as bar:
        _, optimizer, losses = nnx_train_step(method(), steps=args.steps, seed=args.seed)
        out["nnx"] = losses
        print(
            f"1. NNX, {args.method}: losses {losses[0]} -> {losses[-1]};"
            f" weights {log_weights(optimizer.opt_state)}"
        )
        bar.update()
        state, losses = linen_train_step(method(), steps=args.steps, seed=args.seed)
        out["linen"] = losses
        print(
            f"2. Linen, {args.method}: losses {losses[0]} -> {losses[-1]};"
            f" weights {log_weights(state.opt_state)}"
        )
        bar.update()
        state, losses = sdmgrad_stochastic_step(steps=args.steps, seed=args.seed)
        out["sdmgrad"] = losses
        print(
            f"3. SDMGrad with cross_gramian: losses {losses[0]} -> {losses[-1]};"
            f" weights {log_weights(state.opt_state)}"
        )
        bar.update()
        optimizer, alphas = scheduled_hyperparameter(steps=args.steps, seed=args.seed)
        out["alphas"] = alphas
        print(
            f"4. optax.inject_hyperparams(mtl_optax.cagrad): alpha {alphas[0]:.3f} ->"
            f" {alphas[-1]:.3f}; weights {log_weights(optimizer.opt_state)}"
        )
        bar.update()
        out["weights"] = log_weights(optimizer.opt_state)
        print("5. optax.tree_utils.tree_get(opt_state, 'weights'):", out["weights"])
        bar.update()
    return out


if __name__ == "__main__":
    main()
