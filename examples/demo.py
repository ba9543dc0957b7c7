"""mtl_optax demo: every multi-task method on one small regression problem.

What it shows
-------------
A synthetic regression with ``K = 3`` tasks that share most of their structure
(a common nonlinear feature of the inputs) but whose targets are on deliberately
different scales (x1, x10, x0.1). One Flax NNX model, a shared MLP trunk with
one linear head per task, is trained with every method in the registry
(``mtl_optax.available()``), each chained with Adam::

    optimizer = nnx.Optimizer(model, optax.chain(method, optax.adam(lr)), wrt=nnx.Param)
    losses, grads = mtl_optax.task_grads(loss_fn, model, x, y)  # [K] losses, [K, ...] grads
    optimizer.update(model, grads, value=losses)

With ``mean`` or ``sum`` the shared trunk is driven almost entirely by the
x10 task (its squared error, and so its gradient, is 100 times the x1 task's
and 10,000 times the x0.1 task's), so the small-scale tasks are learned poorly.
``constant`` with inverse-variance weights removes the scale difference;
methods that adapt the weights should do the same without being told. The
table reports each task's test MSE divided by that task's target variance
(1.0 = predicting the mean), so the columns are comparable across tasks.

Methods registered later are picked up automatically when they can be built
without arguments; those that need some get them from :func:`method_hparams`,
and any method that still cannot be built is skipped with a note.

How to run
----------
::

    python examples/demo.py                      # all methods, default settings
    python examples/demo.py --methods mean,constant --steps 1000 --seed 1

Expected runtime on 2 CPU cores: about 80 s for every method, 10-15 s with the
four basic methods (``constant``, ``mean``, ``rlw``, ``sum``): about 2 s of
imports, then 2-3 s per method, most of it JAX compilation (the 500 training
steps take about 1 ms each). ``mean`` and ``sum`` give nearly the same numbers:
they differ by the factor ``K``, which Adam's normalisation removes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import mtl_optax

NUM_TASKS = 3
TARGET_SCALES = (1.0, 10.0, 0.1)  # deliberately different loss scales
NUM_FEATURES = 8
NUM_SHARED = 4  # width of the latent structure the tasks share
NUM_TRAIN = 1024
NUM_TEST = 1024
NOISE = 0.1
HIDDEN = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 2  # untimed steps before the timing starts


class Data(NamedTuple):
    """Inputs ``x [N, D]`` and targets ``y [N, K]``."""

    x: jax.Array
    y: jax.Array


def make_data(seed: int) -> tuple[Data, Data]:
    """A train and a test split of the synthetic multi-task regression.

    Every task is ``y_k = s_k * (tanh(x B) c_k + 0.5 sin(x a_k) + noise)``: the
    term ``tanh(x B)`` is shared by all tasks (through different read-outs
    ``c_k``), ``sin(x a_k)`` is task-specific, and ``s_k`` is the task's scale.
    """
    k_b, k_c, k_a, k_x, k_eps = jax.random.split(jax.random.key(seed), 5)
    b = jax.random.normal(k_b, (NUM_FEATURES, NUM_SHARED)) / jnp.sqrt(NUM_FEATURES)
    c = jax.random.normal(k_c, (NUM_SHARED, NUM_TASKS))
    a = jax.random.normal(k_a, (NUM_FEATURES, NUM_TASKS)) / jnp.sqrt(NUM_FEATURES)
    n = NUM_TRAIN + NUM_TEST
    x = jax.random.normal(k_x, (n, NUM_FEATURES))
    eps = NOISE * jax.random.normal(k_eps, (n, NUM_TASKS))
    y = (jnp.tanh(x @ b) @ c + 0.5 * jnp.sin(2.0 * x @ a) + eps) * jnp.asarray(TARGET_SCALES)
    return Data(x[:NUM_TRAIN], y[:NUM_TRAIN]), Data(x[NUM_TRAIN:], y[NUM_TRAIN:])


class MultiTaskMLP(nnx.Module):
    """A shared two-layer MLP trunk and one linear head per task."""

    def __init__(self, in_features: int, hidden: int, num_tasks: int, *, rngs: nnx.Rngs) -> None:
        self.trunk1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.trunk2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(hidden, 1, rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """Predictions ``[N, K]``."""
        h = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
        return jnp.concatenate([head(h) for head in self.heads], axis=-1)


def loss_fn(model: MultiTaskMLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``[K]`` per-task mean squared errors."""
    return jnp.mean((model(x) - y) ** 2, axis=0)


@nnx.jit
def train_step(
    model: MultiTaskMLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
    """One step of the multi-task method; returns the ``[K]`` training losses."""
    losses, grads = mtl_optax.task_grads(loss_fn, model, x, y)
    optimizer.update(model, grads, value=losses)
    return losses


@nnx.jit
def evaluate(model: MultiTaskMLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``[K]`` test MSEs divided by each task's target variance."""
    return loss_fn(model, x, y) / jnp.var(y, axis=0)


def method_hparams(train: Data, seed: int) -> dict[str, dict[str, Any]]:
    """Hyperparameters of the methods that need some; the others use defaults."""
    inv_var = 1.0 / np.asarray(jnp.var(train.y, axis=0), np.float64)
    return {
        # Inverse target variances, normalised to sum to one like `mean`'s weights:
        # each task then contributes a loss of comparable size.
        "constant": {"weights": (inv_var / inv_var.sum()).tolist()},
        "rlw": {"key": seed},
        "fairgrad": {"alpha": 2.0},  # TorchJD requires alpha; 1.0 would repeat nash_mtl
        # The Byzantine-robust aggregators need their count of faulty tasks: with
        # K = 3, Krum allows none (K >= n_byzantine + 3) and so picks one task's
        # gradient per step; trimming one task at each end of 3 is the median.
        "krum": {"n_byzantine": 0},
        "trimmed_mean": {"trim_number": 1},
    }


class Result(NamedTuple):
    """One row of the table."""

    method: str
    test_nmse: np.ndarray  # [K]
    ms_per_step: float  # after compilation (NaN when every step was a warm-up step)
    timed_steps: int


def build_method(
    name: str, hparams: dict[str, dict[str, Any]]
) -> optax.GradientTransformationExtraArgs:
    """The method ``name`` with its hyperparameters from ``hparams`` (if any).

    ``num_tasks`` is passed to the methods that take it, so that their state has
    its final shape from ``init`` on and the jitted step compiles only once.

    Raises:
      TypeError, ValueError: the factory cannot be built with these arguments.
    """
    kwargs = hparams.get(name, {})
    try:
        return mtl_optax.get(name, **{"num_tasks": NUM_TASKS, **kwargs})
    except TypeError:  # The factory does not take `num_tasks`.
        return mtl_optax.get(name, **kwargs)


def run_method(
    name: str,
    method: optax.GradientTransformationExtraArgs,
    train: Data,
    test: Data,
    *,
    steps: int,
    seed: int,
) -> Result:
    """Trains a fresh model with ``method`` for ``steps`` full-batch steps."""
    model = MultiTaskMLP(NUM_FEATURES, HIDDEN, NUM_TASKS, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.chain(method, optax.adam(LEARNING_RATE)), wrt=nnx.Param)
    # Binds the model and optimizer once, which saves nnx.jit's graph traversal at every call.
    step = nnx.cached_partial(train_step, model, optimizer)
    # The first steps compile (twice if the method's state changes shape after its first
    # update); they are not timed.
    warmup = min(WARMUP_STEPS, steps)
    for _ in range(warmup):
        step(train.x, train.y).block_until_ready()
    timed = steps - warmup
    start = time.perf_counter()
    for _ in tqdm(range(timed), desc=f"{name:>12}", leave=False, disable=None):
        step(train.x, train.y)
    jax.block_until_ready(nnx.state(model))
    elapsed = time.perf_counter() - start
    return Result(
        method=name,
        test_nmse=np.asarray(evaluate(model, test.x, test.y)),
        ms_per_step=1e3 * elapsed / timed if timed else float("nan"),
        timed_steps=timed,
    )


def format_table(results: Sequence[Result]) -> str:
    """The results as a plain-text table."""
    header = (
        ["method"]
        + [f"task {k} (x{s:g})" for k, s in enumerate(TARGET_SCALES)]
        + ["mean", "ms/step"]
    )
    rows = [
        [r.method]
        + [f"{v:.4f}" for v in r.test_nmse]
        + [f"{r.test_nmse.mean():.4f}", f"{r.ms_per_step:.2f}" if r.timed_steps else "n/a"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per method")
    parser.add_argument(
        "--methods",
        type=str,
        default=None,
        help=f"comma-separated method names (default: all of {', '.join(mtl_optax.available())})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, model and methods")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.methods is None:
        args.methods = mtl_optax.available(aliases=False)  # every method once
    else:
        args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(mtl_optax.available()))
        if unknown:
            parser.error(
                f"unknown method(s) {', '.join(unknown)};"
                f" available: {', '.join(mtl_optax.available())}"
            )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    train, test = make_data(args.seed)
    hparams = method_hparams(train, args.seed)
    print(
        f"{NUM_TASKS} tasks (target scales {', '.join(f'x{s:g}' for s in TARGET_SCALES)}),"
        f" {NUM_TRAIN} train / {NUM_TEST} test points, {args.steps} full-batch Adam steps,"
        f" jax {jax.__version__} on {jax.default_backend()}."
    )
    results = []
    for name in args.methods:
        try:
            method = build_method(name, hparams)
        except (TypeError, ValueError) as err:
            print(f"skipping {name}: cannot build it with {hparams.get(name, {})} ({err})")
            continue
        results.append(run_method(name, method, train, test, steps=args.steps, seed=args.seed))
    print()
    print("Test MSE / target variance per task (lower is better; 1.0 = predicting the mean):")
    print(format_table(results))
    print(f"Total: {time.perf_counter() - start:.1f} s, JAX compilation included.")


if __name__ == "__main__":
    main()
