"""The two-objective toy problem of CAGrad, Nash-MTL and FAMO, with every method.

What it shows
-------------
The 2-D, two-loss problem of Liu et al. (CAGrad, 2021), in the version of
Navon et al. (Nash-MTL, 2022; also used by FAMO, 2023): the first loss is
scaled by 0.1, so that the two gradients differ in size as well as in
direction. Each method in the registry (``mtl_optax.available(aliases=False)``)
is chained with Adam (learning rate 1e-3) and run from the five starting points
of Nash-MTL, ``(-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1)``, for 35,000
steps (Nash-MTL's ``n_epochs`` default; CAGrad's ``toy.py`` runs 100,000 steps
from three of the points, unscaled: ``--steps 100000 --scale 1``). The whole run
of one method is ONE jitted ``lax.scan`` over the steps, ``vmap``-ed over the
five starts::

    opt = optax.chain(method, optax.adam(1e-3))
    def step(carry, _):
        x, state = carry
        losses, grads = mtl_optax.task_grads(toy_losses, x)  # [2], [2, 2]
        updates, state = opt.update(grads, state, x, value=losses)
        return (optax.apply_updates(x, updates), state), x

Outputs (in ``--out``, default ``examples/figures``, ``examples/figures/quick`` with
``--quick``): one figure per method, ``toy_<method>.png``, with the
trajectories on the contour of the mean loss in parameter space (left) and in
loss space (right), the Pareto set and the minimiser of the mean loss; ``toy_overview.png`` (MEAN, MGDA, PCGrad and CAGrad
side by side); and ``toy_summary.md``, the table of final losses per method and
start, and whether the run ended on the Pareto set (printed too).

The problem
-----------
With :math:`c_1 = \\max(\\tanh(x_2/2), 0)` and :math:`c_2 = \\max(\\tanh(-x_2/2), 0)`,

.. math::
  f_1 = c_1 \\big(\\log\\max(|\\tfrac12(-x_1 - 7) - \\tanh(-x_2)|, 5\\cdot10^{-6}) + 6\\big)
      + c_2 \\big(((x_1 - 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\\big), \\\\
  f_2 = c_1 \\big(\\log\\max(|\\tfrac12(-x_1 + 3) + \\tanh(-x_2) + 2|, 5\\cdot10^{-6}) + 6\\big)
      + c_2 \\big(((x_1 + 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\\big),

and the losses optimised are :math:`(s f_1, f_2)` with ``--scale`` :math:`s = 0.1`
(Nash-MTL's default; CAGrad's paper has :math:`s = 1`). The losses are negative
over most of the plane. The derivative of the clamp :math:`\\max(t, 0)` at
:math:`t = 0` is 1, as in PyTorch (``jnp.maximum`` would give 1/2; it matters
at the start ``(0, 0)``).

**Pareto set.** For :math:`x_2 < 0` only the quadratic parts remain, and a
point is Pareto-stationary when a convex combination of the gradients vanishes.
The :math:`x_1` component fixes the weight, :math:`w = (x_1 + 7)/14` on
:math:`f_1` (for :math:`s = 1`), which needs :math:`-7 \\le x_1 \\le 7`; the
:math:`x_2` component then reads

.. math::
  c_2'(x_2)\\, Q + c_2(x_2)\\, 0.02\\, (x_2 + 8) = 0, \\qquad
  Q = (49 - x_1^2)/10 + 0.01 (x_2 + 8)^2 - 20,

whose root lies between -8.43 (at :math:`x_1 = \\pm 7`) and -8.355 (at
:math:`x_1 = 0`): a slightly bent arc, which the papers draw as the segment
:math:`x_2 = -8.3552, -7 \\le x_1 \\le 7` (its value at :math:`x_1 = 0`). The
scale :math:`s` changes the weights but not the set. :func:`pareto_set`
computes it by bisection on that equation, with the gradients from autodiff.

**Reached the Pareto set** (the table's last column): the final point is
Pareto-stationary, i.e. the norm of the min-norm point of the two gradients,
:math:`\\min_{w \\in \\Delta} \\|w_1 \\nabla (s f_1) + w_2 \\nabla f_2\\|`
(:func:`mtl_optax.solvers.min_norm` on the 2x2 Gramian), is below
``--threshold`` (default 1e-3; column "stationary"), and it lies within
:data:`ON_SET` (0.05) of the computed Pareto set. Both are needed. The problem
is very flat across the set: for :math:`-7 \\le x_1 \\le 7` the :math:`x_1`
component of the best combination is exactly 0, and its :math:`x_2` component
grows by only about :math:`3\\cdot10^{-3}` per unit of distance (at
:math:`x_1 = 0`, :math:`s = 0.1`), so the threshold alone accepts points up to
about 0.3 away (runs that converged end below 1e-4). And the problem has
Pareto-stationary points off the Pareto set: just below the kink
:math:`x_2 = 0`, for :math:`x_1 \\lesssim -6.9`, the two :math:`x_2`
derivatives have opposite signs and the :math:`x_1` derivatives vanish.

Hyperparameters: ``cagrad`` uses :math:`c = 0.4` (Nash-MTL's default for this
experiment) and ``max_iter=20`` for its dual solver (the default 1000 makes
the scan about 25 times slower: near the kink :math:`g_w = 0` jaxopt's projected
gradient runs to ``max_iter``, and under ``vmap`` every start waits for the
slowest; 20 gives the same final points, to 1e-4, as 50 over 20,000 steps and
as the default over 3,000 steps);
``constant`` uses the weights :math:`(1/s, 1)`, normalised, which undo the
scale; the random methods use ``--seed``; ``compose`` (a combinator of other
methods) is skipped. ``m_conflict_free`` normalises its update like Adam and
is chained with ``optax.sgd`` instead (as its reference recommends).

How to run
----------
::

    pip install -e ".[examples]"
    python examples/toy_two_objectives.py                 # every method, 35,000 steps
    python examples/toy_two_objectives.py --quick         # mean, mgda, pcgrad, cagrad; < 1 min
    python examples/toy_two_objectives.py --methods mean,cagrad --steps 100000 --scale 1

Measured on 2 shared CPU cores (jax 0.10.2): the full run (17 methods) takes
45 to 75 s (about 1 to 3 s per method, compilation included, and 20 to 25 s
for ``cagrad``); ``--quick`` 25 to 60 s.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

import mtl_optax
from mtl_optax import solvers

STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))  # Nash-MTL's
LEARNING_RATE = 1e-3
STEPS = 35_000  # Nash-MTL's n_epochs default (CAGrad's toy.py: 100,000)
SCALE = 0.1  # Nash-MTL's scale of the first loss (CAGrad: 1)
LOWER = 5e-6  # the clamp inside the logarithms
THRESHOLD = 1e-3  # on the norm of the min-norm point: "Pareto-stationary"
ON_SET = 0.05  # on the distance to the computed Pareto set: "reached" (with THRESHOLD)
QUICK_METHODS = ("mean", "mgda", "pcgrad", "cagrad")
QUICK_STEPS = 20_000
OVERVIEW = ("mean", "mgda", "pcgrad", "cagrad")
SKIP = {"compose": "a combinator of other methods, not a method by itself"}
# Methods whose update is already Adam-normalised: chained with SGD (same learning rate).
SGD_METHODS = ("m_conflict_free",)
PLOT_EVERY = 50  # keep every 50th point of a trajectory in the figures
GRID = 241  # contour resolution


def toy_losses(x: jax.Array, scale: float = SCALE) -> jax.Array:
    """The two losses ``(scale * f1, f2)`` at the point ``x = (x1, x2)``."""
    x1, x2 = x[..., 0], x[..., 1]
    t = jnp.tanh(0.5 * x2)
    # max(t, 0) with derivative 1 at t = 0 (PyTorch's clamp), not jnp.maximum's 1/2.
    c1 = jnp.where(t >= 0, t, 0.0)
    c2 = jnp.where(-t >= 0, -t, 0.0)
    f1_log = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)), LOWER)) + 6.0
    f2_log = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0), LOWER)) + 6.0
    f1_sq = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    f2_sq = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    f1 = c1 * f1_log + c2 * f1_sq
    f2 = c1 * f2_log + c2 * f2_sq
    return jnp.stack([scale * f1, f2], axis=-1)


def min_norm_distance(x: jax.Array, scale: float = SCALE) -> jax.Array:
    """Norm of the min-norm point of the two loss gradients at ``x`` (0 on the Pareto set)."""
    g = jax.jacrev(toy_losses)(x, scale)  # [2 tasks, 2 coordinates]
    gram = g @ g.T
    w = solvers.min_norm(gram)
    return jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))


@functools.partial(jax.jit, static_argnames=("num",))
def pareto_set(num: int = 201, scale: float = SCALE) -> jax.Array:
    """``[num, 2]`` points of the Pareto set, ``x1`` evenly spaced in ``[-7, 7]``.

    For each ``x1``, the weight that cancels the ``x1`` components of the two
    gradients is set, and the ``x2`` component of the combined gradient is
    brought to 0 by bisection on ``x2`` in ``[-11, -8]`` (it is positive at -8
    and negative at -11). At ``x1 = -7`` and ``x1 = 7`` one gradient's ``x1``
    component is 0 and the weight is 0 or 1.
    """
    jac = jax.jacrev(toy_losses)

    def residual(x1, x2):
        g = jac(jnp.stack([x1, x2]), scale)  # rows: tasks, columns: coordinates
        a1, a2 = g[0, 0], g[1, 0]
        denom = a2 - a1
        w = jnp.where(denom != 0, a2 / jnp.where(denom != 0, denom, 1.0), 0.5)
        return w * g[0, 1] + (1.0 - w) * g[1, 1]

    def solve(x1):
        def body(_, bounds):
            lo, hi = bounds  # residual(lo) < 0 < residual(hi)
            mid = 0.5 * (lo + hi)
            negative = residual(x1, mid) < 0
            return jnp.where(negative, mid, lo), jnp.where(negative, hi, mid)

        lo, hi = lax.fori_loop(0, 40, body, (jnp.float32(-11.0), jnp.float32(-8.0)))
        return jnp.stack([x1, 0.5 * (lo + hi)])

    return jax.vmap(solve)(jnp.linspace(-7.0, 7.0, num))


def build_method(name: str, *, seed: int, scale: float) -> optax.GradientTransformationExtraArgs:
    """The method ``name`` for 2 tasks, with this example's hyperparameters.

    Raises:
      TypeError, ValueError: the method cannot be built (the caller skips it).
    """
    hparams: dict[str, dict[str, Any]] = {
        "cagrad": {"alpha": 0.4, "max_iter": 20},
        "constant": {"weights": [1.0 / (1.0 + scale), scale / (1.0 + scale)]},
        "fairgrad": {"alpha": 2.0},  # TorchJD requires alpha; 1.0 would repeat nash_mtl
    }
    kwargs = {"num_tasks": 2, **hparams.get(name, {})}
    for random_kw in ("key",):
        kwargs[random_kw] = seed
    for drop in ((), ("key",), ("key", "num_tasks")):
        try:
            return mtl_optax.get(name, **{k: v for k, v in kwargs.items() if k not in drop})
        except TypeError:
            continue
    raise TypeError(f"cannot build {name!r} with {kwargs} or a subset of key/num_tasks")


class Run(NamedTuple):
    """One method's run from every start."""

    trajectory: np.ndarray  # [starts, steps + 1, 2]: the points, first and last included
    losses: np.ndarray  # [starts, steps + 1, 2]
    min_norm: np.ndarray  # [starts] at the final point
    seconds: float  # wall time, compilation included


def optimizer(
    method: optax.GradientTransformationExtraArgs, name: str = ""
) -> optax.GradientTransformationExtraArgs:
    """``method`` chained with Adam, or with SGD for the methods of :data:`SGD_METHODS`."""
    inner = optax.sgd(LEARNING_RATE) if name in SGD_METHODS else optax.adam(LEARNING_RATE)
    return optax.chain(method, inner)


def make_run(
    method: optax.GradientTransformationExtraArgs, *, steps: int, scale: float, name: str = ""
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """A jitted function ``starts [S, 2] -> (trajectory, losses, min_norm)``."""
    opt = optimizer(method, name)
    loss_fn = functools.partial(toy_losses, scale=scale)

    def from_one_start(x0: jax.Array):
        def step(carry, _):
            x, state = carry
            losses, grads = mtl_optax.task_grads(loss_fn, x)
            updates, state = opt.update(grads, state, x, value=losses)
            return (optax.apply_updates(x, updates), state), (x, losses)

        (x, _), (xs, ls) = lax.scan(step, (x0, opt.init(x0)), length=steps)
        xs = jnp.concatenate([xs, x[None]])
        ls = jnp.concatenate([ls, loss_fn(x)[None]])
        return xs, ls, min_norm_distance(x, scale)

    return jax.jit(jax.vmap(from_one_start))


def run_method(
    method: optax.GradientTransformationExtraArgs, *, steps: int, scale: float, name: str = ""
) -> Run:
    """Runs ``method`` (named ``name``) from every start in :data:`STARTS` (one compiled scan)."""
    start = time.perf_counter()
    xs, ls, mn = make_run(method, steps=steps, scale=scale, name=name)(jnp.asarray(STARTS))
    xs, ls, mn = jax.device_get((xs, ls, mn))
    return Run(np.asarray(xs), np.asarray(ls), np.asarray(mn), time.perf_counter() - start)


def distance_to_set(points: np.ndarray, pareto: np.ndarray) -> np.ndarray:
    """Euclidean distance from each of ``points [N, 2]`` to the polyline ``pareto``."""
    a, b = pareto[:-1], pareto[1:]  # segments
    ab = b - a
    t = np.clip(
        np.einsum("nsd,sd->ns", points[:, None] - a[None], ab) / np.sum(ab * ab, -1), 0.0, 1.0
    )
    closest = a[None] + t[..., None] * ab[None]
    return np.min(np.linalg.norm(points[:, None] - closest, axis=-1), axis=1)


# ---------------------------------------------------------------------------
# Figures and table.
# ---------------------------------------------------------------------------


def _contour_data(scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.linspace(-10.0, 10.0, GRID)
    xx, yy = np.meshgrid(grid, grid)
    points = jnp.asarray(np.stack([xx, yy], -1), jnp.float32)
    mean = np.asarray(jnp.mean(toy_losses(points, scale), axis=-1))
    return xx, yy, mean


def _draw(
    ax_params: Any,
    ax_losses: Any | None,
    name: str,
    run: Run,
    contour: tuple[np.ndarray, np.ndarray, np.ndarray],
    pareto: np.ndarray,
    pareto_losses: np.ndarray,
    average_optimum: np.ndarray,
) -> None:
    import matplotlib.pyplot as plt

    xx, yy, mean = contour
    ax_params.contourf(xx, yy, mean, levels=20, cmap="viridis", alpha=0.85)
    ax_params.plot(pareto[:, 0], pareto[:, 1], color="0.45", lw=6, label="Pareto set", zorder=1)
    colors = plt.cm.autumn(np.linspace(0.0, 0.9, run.trajectory[0, ::PLOT_EVERY].shape[0]))
    for k in range(run.trajectory.shape[0]):
        traj = run.trajectory[k, ::PLOT_EVERY]
        ax_params.scatter(traj[:, 0], traj[:, 1], c=colors, s=2, zorder=3, rasterized=True)
        ax_params.plot(*run.trajectory[k, 0], "o", color="k", ms=6, zorder=4)
        ax_params.plot(*run.trajectory[k, -1], "X", color="w", mec="k", ms=8, zorder=5)
    ax_params.plot(*average_optimum, "*", color="k", ms=14, zorder=4, label="min. of mean loss")
    ax_params.set(xlim=(-10, 10), ylim=(-10, 10), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    ax_params.set_title(name)
    if ax_losses is None:
        return
    ax_losses.plot(pareto_losses[:, 0], pareto_losses[:, 1], color="0.45", lw=6, zorder=1)
    for k in range(run.losses.shape[0]):
        ls = run.losses[k, ::PLOT_EVERY]
        ax_losses.scatter(ls[:, 0], ls[:, 1], c=colors, s=2, zorder=3, rasterized=True)
        ax_losses.plot(*run.losses[k, 0], "o", color="k", ms=6, zorder=4)
        ax_losses.plot(*run.losses[k, -1], "X", color="w", mec="k", ms=8, zorder=5)
    ax_losses.set(xlabel=r"$\ell_1 = s f_1$", ylabel=r"$\ell_2 = f_2$", title="loss space")


def plot_method(
    path: pathlib.Path, name: str, run: Run, scale: float, pareto: np.ndarray, contour: Any
) -> None:
    """``toy_<name>.png``: parameter space (mean-loss contour) and loss space."""
    import matplotlib.pyplot as plt

    pareto_losses = np.asarray(toy_losses(jnp.asarray(pareto), scale))
    average_optimum = pareto[np.argmin(pareto_losses.mean(-1))]
    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(10, 4.6))
    _draw(ax_p, ax_l, name, run, contour, pareto, pareto_losses, average_optimum)
    ax_p.legend(loc="upper center", fontsize=8, framealpha=0.8)
    fig.suptitle(
        f"{name}: {run.trajectory.shape[1] - 1} {'SGD' if name in SGD_METHODS else 'Adam'}"
        f" steps (lr {LEARNING_RATE:g}), scale s={scale:g}; o start, X end, red to orange: time",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_overview(
    path: pathlib.Path, runs: dict[str, Run], scale: float, pareto: np.ndarray, contour: Any
) -> None:
    """``toy_overview.png``: the methods of :data:`OVERVIEW` that ran, side by side."""
    import matplotlib.pyplot as plt

    names = [n for n in OVERVIEW if n in runs]
    if not names:
        return
    pareto_losses = np.asarray(toy_losses(jnp.asarray(pareto), scale))
    average_optimum = pareto[np.argmin(pareto_losses.mean(-1))]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        _draw(ax, None, name, runs[name], contour, pareto, pareto_losses, average_optimum)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary_table(
    runs: dict[str, Run], pareto: np.ndarray, *, threshold: float, scale: float, steps: int
) -> str:
    """The markdown table of final losses and Pareto-set arrival, per method and start."""
    lines = [
        f"Final losses after {steps} steps (Adam, or SGD for {', '.join(SGD_METHODS)};"
        f" lr {LEARNING_RATE:g}; scale s={scale:g})."
        f" stationary: the norm of the min-norm point of the two gradients is < {threshold:g};"
        f" reached the Pareto set: stationary and within {ON_SET:g} of it.",
        "",
        "| method | start | final x | loss 1 (s f1) | loss 2 (f2) | min-norm | stationary"
        " | dist. to Pareto set | reached |",
        "|---|---|---|---:|---:|---:|:---:|---:|:---:|",
    ]
    reached = {}
    for name, run in runs.items():
        dist = distance_to_set(run.trajectory[:, -1], pareto)
        stationary = run.min_norm < threshold
        reached[name] = stationary & (dist < ON_SET)
        for k, start in enumerate(STARTS):
            x = run.trajectory[k, -1]
            lines.append(
                f"| {name} | ({start[0]:g}, {start[1]:g}) | ({x[0]:.2f}, {x[1]:.2f})"
                f" | {run.losses[k, -1, 0]:.3f} | {run.losses[k, -1, 1]:.3f}"
                f" | {run.min_norm[k]:.1e} | {'yes' if stationary[k] else 'no'}"
                f" | {dist[k]:.2f} | {'yes' if reached[name][k] else 'no'} |"
            )
    lines += [
        "",
        "| method | starts that reached the Pareto set | seconds (compilation included) |",
        "|---|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {int(np.sum(reached[name]))}/{len(STARTS)} | {run.seconds:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps (default {STEPS})")
    parser.add_argument(
        "--methods",
        type=str,
        default=None,
        help="comma-separated method names (default: every registered method)",
    )
    parser.add_argument("--seed", type=int, default=0, help="key of the random methods")
    parser.add_argument("--scale", type=float, default=SCALE, help="scale s of the first loss")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="min-norm threshold")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output folder of the figures and toy_summary.md (default: examples/figures, or examples/figures/quick with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{', '.join(QUICK_METHODS)} only, {QUICK_STEPS} steps (unless given)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        figures = pathlib.Path(__file__).resolve().parent / "figures"
        args.out = figures / "quick" if args.quick else figures
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else STEPS
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not args.scale > 0:
        parser.error("--scale must be positive")
    if args.methods is None:
        args.methods = list(QUICK_METHODS) if args.quick else mtl_optax.available(aliases=False)
    else:
        args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(mtl_optax.available()))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Run]:
    """Runs the example; returns the runs by method name."""
    import matplotlib

    matplotlib.use("Agg")
    begin = time.perf_counter()
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pareto = np.asarray(pareto_set(201, args.scale))
    contour = _contour_data(args.scale)
    runs: dict[str, Run] = {}
    for name in tqdm(args.methods, desc="methods", disable=None):
        if name in SKIP:
            print(f"skipping {name}: {SKIP[name]}")
            continue
        try:
            method = build_method(name, seed=args.seed, scale=args.scale)
        except (TypeError, ValueError) as err:
            print(f"skipping {name}: cannot build it ({err})")
            continue
        runs[name] = run_method(method, steps=args.steps, scale=args.scale, name=name)
        plot_method(args.out / f"toy_{name}.png", name, runs[name], args.scale, pareto, contour)
    plot_overview(args.out / "toy_overview.png", runs, args.scale, pareto, contour)
    table = summary_table(
        runs, pareto, threshold=args.threshold, scale=args.scale, steps=args.steps
    )
    (args.out / "toy_summary.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"Figures and toy_summary.md in {args.out}; total {time.perf_counter() - begin:.1f} s.")
    return runs


if __name__ == "__main__":
    main()
