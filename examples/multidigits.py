"""MultiDigits: a small MultiMNIST built from scikit-learn's digits, with every method.

What it shows
-------------
The MultiMNIST construction of Sener & Koltun (2018) on the 8x8 digits that ship
with scikit-learn (``sklearn.datasets.load_digits``, 1,797 images, no
download): two digits are overlaid on one canvas, one shifted left and one
shifted right; task 1 classifies the left digit, task 2 the right one. One Flax
NNX network (a shared MLP encoder and two linear heads) is trained with every
method of the registry, chained with Adam::

    optimizer = nnx.Optimizer(model, optax.chain(method, optax.adam(lr)), wrt=nnx.Param)
    losses, grads = mtl_optax.task_grads(loss_fn, model, images, labels)  # [2], [2, ...]
    optimizer.update(model, grads, value=losses)

Outputs (in ``--out``, default ``examples/figures``, ``examples/figures/quick`` with
``--quick``): ``multidigits.md``, the table of test accuracy per task and
method over the seeds (mean ± std) with the wall time per step (the jitted
step, measured after its first, compiling, call); ``multidigits_curves.png``, the training loss and the test
accuracy per epoch (mean over the seeds).

The data
--------
The 1,797 images (pixel values 0..16, scaled to [0, 1]) are split once, with a
fixed generator (seed 0) and stratified by class, into 1,257 training and 540
test images, so that the test pairs are made of images never seen in
training. A pair ``(a, b)`` of images gives one 8x12 canvas (8 rows, 12
columns): ``a`` at columns 0-7 (shifted left), ``b`` at columns 4-11 (shifted
right), and where they overlap (columns 4-7) the pixel is the maximum of the
two. The labels are ``(label(a), label(b))``. 6,000 training pairs are drawn
uniformly (with replacement) from the training images and 2,000 test pairs
from the test images, with the same fixed generator; the seeds of the
experiment (``--seeds``) change the network's initialisation, the order of the
mini-batches and the methods' random keys, not the data.

The network: the flattened canvas (96 inputs) -> Linear(128) -> ReLU ->
Linear(64) -> ReLU (the shared encoder), then one Linear(10) head per task;
the task losses are the mean cross-entropies of the two heads. Adam, learning
rate 1e-3, mini-batches of 128, 8 epochs (46 steps each). ``sdmgrad`` runs in
its deterministic form (the Gramian of the batch's task gradients; its
stochastic form, with ``cross_gramian=`` from two other batches, is shown in
``examples/recipes.py``); ``constant`` uses equal weights ``(0.5, 0.5)``; ``m_conflict_free``, whose update is already
normalised like Adam's, is chained with ``optax.sgd`` (as its reference
recommends);
``compose`` (a combinator of other methods) is skipped.

How to run
----------
::

    pip install -e ".[examples]"
    python examples/multidigits.py                    # every method, 3 seeds, 8 epochs
    python examples/multidigits.py --quick            # mean, mgda, cagrad; 1 seed, 1 epoch
    python examples/multidigits.py --methods mean,pcgrad --seeds 0,1,2,3,4 --epochs 20

Measured on 2 shared CPU cores (jax 0.10.2): the full run (17 methods, 3
seeds) takes about 3 min, most of it compilation (one jitted step per method
and seed); a step takes 1 to 2.5 ms. ``--quick`` takes 10 to 40 s.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
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

NUM_TASKS = 2
NUM_CLASSES = 10
HEIGHT, WIDTH, SHIFT = 8, 12, 4  # canvas 8x12; the right digit starts at column 4
NUM_TRAIN_PAIRS = 6000
NUM_TEST_PAIRS = 2000
TEST_FRACTION = 0.3
DATA_SEED = 0
HIDDEN = (128, 64)
LEARNING_RATE = 1e-3
BATCH_SIZE = 128
EPOCHS = 8
SEEDS = (0, 1, 2)
QUICK_METHODS = ("mean", "mgda", "cagrad")
SKIP = {
    "compose": "a combinator of other methods, not a method by itself",
    "krum": "Krum needs at least 3 tasks (n_byzantine + 3), as in TorchJD",
    "trimmed_mean": "with 2 tasks the only trim is 0, which is the mean",
}
# Methods whose update is already Adam-normalised: chained with SGD (same learning rate).
SGD_METHODS = ("m_conflict_free",)


class Data(NamedTuple):
    """Canvases ``x [N, 8, 12]`` (float32 in [0, 1]) and labels ``y [N, 2]`` (int32)."""

    x: np.ndarray
    y: np.ndarray


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Canvases ``[N, 8, 12]``: ``left`` at columns 0-7, ``right`` at 4-11, max where both."""
    n = left.shape[0]
    a = np.zeros((n, HEIGHT, WIDTH), np.float32)
    b = np.zeros((n, HEIGHT, WIDTH), np.float32)
    a[:, :, :8] = left
    b[:, :, SHIFT : SHIFT + 8] = right
    return np.maximum(a, b)


def make_data(seed: int = DATA_SEED) -> tuple[Data, Data]:
    """The train and test pairs (see the module docstring)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8]
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    rng = np.random.default_rng(seed)

    def pairs(x: np.ndarray, y: np.ndarray, n: int) -> Data:
        i, j = rng.integers(0, x.shape[0], size=(2, n))
        return Data(overlay(x[i], x[j]), np.stack([y[i], y[j]], axis=1))

    return pairs(x_tr, y_tr, NUM_TRAIN_PAIRS), pairs(x_te, y_te, NUM_TEST_PAIRS)


class MultiDigitNet(nnx.Module):
    """A shared MLP encoder and one linear classification head per task."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        sizes = (HEIGHT * WIDTH, *HIDDEN)
        self.encoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.heads = nnx.List(
            [nnx.Linear(HIDDEN[-1], NUM_CLASSES, rngs=rngs) for _ in range(NUM_TASKS)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[K, N, 10]`` for canvases ``x [N, 8, 12]``."""
        h = x.reshape(x.shape[0], -1)
        for layer in self.encoder:
            h = nnx.relu(layer(h))
        return jnp.stack([head(h) for head in self.heads])


def loss_fn(model: MultiDigitNet, x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``[K]`` mean cross-entropies of the two heads."""
    logits = model(x)
    return jnp.stack(
        [
            optax.softmax_cross_entropy_with_integer_labels(logits[k], y[:, k]).mean()
            for k in range(NUM_TASKS)
        ]
    )


@nnx.jit
def train_step(
    model: MultiDigitNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
    """One step of the multi-task method; returns the ``[K]`` batch losses."""
    losses, grads = mtl_optax.task_grads(loss_fn, model, x, y)
    optimizer.update(model, grads, value=losses)
    return losses


@nnx.jit
def accuracy(model: MultiDigitNet, x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``[K]`` accuracies."""
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y.T, axis=-1)


def build_method(name: str, seed: int) -> optax.GradientTransformationExtraArgs:
    """The method ``name`` for 2 tasks, with this example's hyperparameters.

    Raises:
      TypeError, ValueError: the method cannot be built (the caller skips it).
    """
    kwargs: dict[str, Any] = {"num_tasks": NUM_TASKS, "key": seed}
    if name == "constant":
        kwargs["weights"] = [0.5, 0.5]
    if name == "fairgrad":
        kwargs["alpha"] = 2.0  # TorchJD requires alpha; 1.0 would repeat nash_mtl
    for drop in ((), ("key",), ("key", "num_tasks")):
        try:
            return mtl_optax.get(name, **{k: v for k, v in kwargs.items() if k not in drop})
        except TypeError:
            continue
    raise TypeError(f"cannot build {name!r} with {kwargs} or a subset of key/num_tasks")


class Run(NamedTuple):
    """One method and seed."""

    train_loss: np.ndarray  # [epochs, K] mean batch loss per epoch
    test_accuracy: np.ndarray  # [epochs, K] after each epoch
    ms_per_step: float  # after compilation; NaN with a single step


def train(
    method: optax.GradientTransformationExtraArgs,
    train_data: Data,
    test_data: Data,
    *,
    seed: int,
    epochs: int,
    name: str = "",
) -> Run:
    """Trains a fresh network with ``method`` (named ``name``); accuracy after every epoch.

    The method is chained with Adam, or with SGD for :data:`SGD_METHODS`.
    """
    model = MultiDigitNet(rngs=nnx.Rngs(seed))
    inner = optax.sgd(LEARNING_RATE) if name in SGD_METHODS else optax.adam(LEARNING_RATE)
    optimizer = nnx.Optimizer(model, optax.chain(method, inner), wrt=nnx.Param)
    step = nnx.cached_partial(train_step, model, optimizer)
    rng = np.random.default_rng(seed)
    x_test, y_test = jnp.asarray(test_data.x), jnp.asarray(test_data.y)
    steps_per_epoch = train_data.x.shape[0] // BATCH_SIZE
    losses, accuracies = [], []
    timed_seconds, timed_steps = 0.0, 0
    for epoch in range(epochs):
        order = rng.permutation(train_data.x.shape[0])
        epoch_losses = []
        start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            epoch_losses.append(step(train_data.x[idx], train_data.y[idx]))
            if epoch == 0 and i == 0:  # the first call compiles: not timed
                jax.block_until_ready(epoch_losses[-1])
                start = time.perf_counter()
        jax.block_until_ready(epoch_losses)
        timed_seconds += time.perf_counter() - start
        timed_steps += steps_per_epoch - (epoch == 0)
        losses.append(np.mean(np.asarray(epoch_losses), axis=0))
        accuracies.append(np.asarray(accuracy(model, x_test, y_test)))
    return Run(
        np.stack(losses),
        np.stack(accuracies),
        1e3 * timed_seconds / timed_steps if timed_steps else float("nan"),
    )


# ---------------------------------------------------------------------------
# Table and figure.
# ---------------------------------------------------------------------------


def results_table(runs: dict[str, list[Run]], *, epochs: int) -> str:
    """Markdown table: final test accuracy per task (mean ± std over seeds), ms/step."""
    num_seeds = len(next(iter(runs.values()))) if runs else 0
    lines = [
        f"Test accuracy (%) after {epochs} epochs, mean ± std over {num_seeds} seed(s);"
        f" {NUM_TRAIN_PAIRS} train / {NUM_TEST_PAIRS} test pairs; ms/step of the jitted"
        " step after compilation (median over seeds).",
        "",
        "| method | task 1 (left) | task 2 (right) | mean | ms/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seed_runs in runs.items():
        acc = 100.0 * np.stack([r.test_accuracy[-1] for r in seed_runs])  # [seeds, K]
        cells = [f"{acc[:, k].mean():.1f} ± {acc[:, k].std():.1f}" for k in range(NUM_TASKS)]
        mean_acc = acc.mean(axis=1)
        ms = np.nanmedian([r.ms_per_step for r in seed_runs])
        lines.append(
            f"| {name} | {' | '.join(cells)} | {mean_acc.mean():.1f} ± {mean_acc.std():.1f}"
            f" | {ms:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(path: pathlib.Path, runs: dict[str, list[Run]]) -> None:
    """Training loss (sum of the tasks) and mean test accuracy per epoch, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.cm.tab20(np.linspace(0.0, 1.0, max(len(runs), 2)))
    for color, (name, seed_runs) in zip(colors, runs.items(), strict=False):
        loss = np.mean([r.train_loss.sum(axis=1) for r in seed_runs], axis=0)
        acc = 100.0 * np.mean([r.test_accuracy.mean(axis=1) for r in seed_runs], axis=0)
        epochs = np.arange(1, loss.shape[0] + 1)
        ax_loss.plot(epochs, loss, "-o", ms=3, color=color, label=name)
        ax_acc.plot(epochs, acc, "-o", ms=3, color=color, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (task 1 + task 2)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy, mean of the tasks (%)")
    ax_loss.grid(alpha=0.3)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("MultiDigits (8x12 overlaid sklearn digits), mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default {EPOCHS})")
    parser.add_argument(
        "--methods", type=str, default=None, help="comma-separated names (default: all)"
    )
    parser.add_argument(
        "--seeds", type=str, default=None, help="comma-separated seeds (default 0,1,2)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output folder of multidigits.md and multidigits_curves.png (default: examples/figures, or examples/figures/quick with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{', '.join(QUICK_METHODS)}, seed 0, 1 epoch (unless given)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        figures = pathlib.Path(__file__).resolve().parent / "figures"
        args.out = figures / "quick" if args.quick else figures
    if args.epochs is None:
        args.epochs = 1 if args.quick else EPOCHS
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(SEEDS)
    else:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.methods is None:
        args.methods = list(QUICK_METHODS) if args.quick else mtl_optax.available(aliases=False)
    else:
        args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(mtl_optax.available()))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[Run]]:
    """Runs the example; returns the runs by method name (one per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    begin = time.perf_counter()
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = make_data()
    runs: dict[str, list[Run]] = {}
    jobs = [(name, seed) for name in args.methods for seed in args.seeds]
    for name, seed in tqdm(jobs, desc="method x seed", disable=None):
        if name in SKIP:
            if seed == args.seeds[0]:
                print(f"skipping {name}: {SKIP[name]}")
            continue
        try:
            method = build_method(name, seed)
        except (TypeError, ValueError) as err:
            if seed == args.seeds[0]:
                print(f"skipping {name}: cannot build it ({err})")
            continue
        run = train(method, train_data, test_data, seed=seed, epochs=args.epochs, name=name)
        runs.setdefault(name, []).append(run)
    table = results_table(runs, epochs=args.epochs)
    (args.out / "multidigits.md").write_text(table, encoding="utf-8")
    plot_curves(args.out / "multidigits_curves.png", runs)
    print(table)
    print(f"Written to {args.out}; total {time.perf_counter() - begin:.1f} s.")
    return runs


if __name__ == "__main__":
    main()
