"""Smoke and property tests of the examples (toy problem, MultiDigits, recipes,
the demo and the representation-gradient example).

Each example's ``main`` runs here with a few steps, its figures and tables
written to ``tmp_path`` or its printed table captured. The examples need the
``examples`` extra (matplotlib, scikit-learn, tqdm, flax); without them these
tests are skipped.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("flax")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
MAX_PNG_BYTES = 300_000


def _example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def toy():
    return _example("toy_two_objectives")


@pytest.fixture(scope="module")
def multidigits():
    return _example("multidigits")


@pytest.fixture(scope="module")
def recipes():
    return _example("recipes")


@pytest.fixture(scope="module")
def demo():
    return _example("demo")


@pytest.fixture(scope="module")
def representation_gradients():
    return _example("representation_gradients")


# ---------------------------------------------------------------------------
# The toy problem.
# ---------------------------------------------------------------------------


def _torch_toy(torch, x, scale):
    """Nash-MTL's ``experiments/toy/problem.py`` losses, written out in torch."""
    x1, x2 = x[0], x[1]
    lower = 0.000005
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), lower).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), lower).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([(f1 * c1 + f1_sq * c2) * scale, f2 * c1 + f2_sq * c2])


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_toy_losses_and_gradients_match_torch_formula(toy, x64, scale):
    """Losses and Jacobians equal torch autograd's (float64, 1e-12), at the starts and at random points.

    The start (0, 0) sits on the kink of the clamps max(tanh(+-x2/2), 0): torch's
    clamp passes a derivative of 1 there, and the example must too.
    """
    from tests.parity.conftest import require_reference

    torch = require_reference("torch")
    rng = np.random.default_rng(0)
    points = np.concatenate([np.asarray(toy.STARTS), rng.uniform(-10, 10, (20, 2))])
    jac = jax.jit(jax.jacrev(toy.toy_losses))
    for p in points:
        xt = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        ref = _torch_toy(torch, xt, scale)
        ref_jac = np.stack(
            [torch.autograd.grad(ref[k], xt, retain_graph=True)[0].numpy() for k in range(2)]
        )
        x = jnp.asarray(p, jnp.float64)
        np.testing.assert_allclose(toy.toy_losses(x, scale), ref.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(jac(x, scale), ref_jac, rtol=1e-12, atol=1e-14)


def test_toy_pareto_set_is_pareto_stationary_and_matches_the_papers(toy):
    """Every computed point has a min-norm point ~0 (< 1e-4), points 0.5 above do not.

    At x1 = 0 the set is at x2 = -8.3552, the value CAGrad's and Nash-MTL's
    plots use for the segment they draw; it bends down to about -8.43 at x1 = +-7.
    """
    pareto = toy.pareto_set(101)
    min_norm = jax.jit(jax.vmap(toy.min_norm_distance))
    on = min_norm(pareto)
    off = min_norm(pareto[1:-1] + jnp.array([0.0, 0.5]))
    assert float(jnp.max(on)) < 1e-4
    assert float(jnp.min(off)) > toy.THRESHOLD
    assert abs(float(pareto[50, 1]) - (-8.3552)) < 1e-3
    assert -8.45 < float(pareto[0, 1]) < -8.40 and -8.45 < float(pareto[-1, 1]) < -8.40


def test_toy_scan_equals_a_python_loop_of_steps(toy):
    """The compiled lax.scan over steps and starts gives the step-by-step trajectory."""
    import optax

    method = mtl_optax.pcgrad(num_tasks=2)
    steps = 25
    run = toy.run_method(method, steps=steps, scale=0.1)
    opt = optax.chain(method, optax.adam(toy.LEARNING_RATE))

    @jax.jit
    def step(x, state):
        losses, grads = mtl_optax.task_grads(toy.toy_losses, x)
        updates, state = opt.update(grads, state, x, value=losses)
        return optax.apply_updates(x, updates), state

    for k, start in enumerate(toy.STARTS):
        x = jnp.asarray(start)
        state = opt.init(x)
        for _ in range(steps):
            x, state = step(x, state)
        np.testing.assert_allclose(run.trajectory[k, -1], x, rtol=1e-5, atol=1e-6)
    assert run.trajectory.shape == (len(toy.STARTS), steps + 1, 2)
    np.testing.assert_array_equal(run.trajectory[:, 0], np.asarray(toy.STARTS, np.float32))


def test_toy_main_writes_figures_and_table(toy, tmp_path):
    """main() with two methods and 300 steps: one PNG per method, the overview, the table."""
    runs = toy.main(["--methods", "mean,mgda", "--steps", "300", "--out", str(tmp_path)])
    assert set(runs) == {"mean", "mgda"}
    for name in ("toy_mean.png", "toy_mgda.png", "toy_overview.png"):
        size = (tmp_path / name).stat().st_size
        assert 1_000 < size < MAX_PNG_BYTES, (name, size)
    table = (tmp_path / "toy_summary.md").read_text()
    assert table.count("| mean | (") == len(toy.STARTS)
    assert table.count("| mgda | (") == len(toy.STARTS)
    for run in runs.values():
        assert np.all(np.isfinite(run.trajectory)) and np.all(np.isfinite(run.min_norm))
        # Every start moved, and by at most 300 Adam steps: Adam's step per coordinate is
        # below lr (1 - b1) / sqrt(1 - b2) = 3.16 lr, so its length below sqrt(2) * 3.16 lr.
        moved = np.linalg.norm(run.trajectory[:, -1] - run.trajectory[:, 0], axis=-1)
        bound = 300 * np.sqrt(2.0) * 0.1 / np.sqrt(1e-3) * toy.LEARNING_RATE
        assert np.all(moved > 0) and np.all(moved < bound), (moved, bound)


def test_toy_skips_what_it_cannot_build(toy, tmp_path, capsys):
    """compose (a combinator) is skipped with a printed note, the others still run."""
    runs = toy.main(["--methods", "compose,sum", "--steps", "5", "--out", str(tmp_path)])
    assert set(runs) == {"sum"}
    assert "skipping compose" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# MultiDigits.
# ---------------------------------------------------------------------------


def test_multidigits_overlay_puts_one_digit_left_and_one_right(multidigits):
    """Columns 0-3 are the left digit's, 8-11 the right one's, 4-7 their maximum."""
    rng = np.random.default_rng(0)
    left, right = rng.uniform(size=(2, 3, 8, 8)).astype(np.float32)
    canvas = multidigits.overlay(left, right)
    assert canvas.shape == (3, 8, 12)
    np.testing.assert_array_equal(canvas[:, :, :4], left[:, :, :4])
    np.testing.assert_array_equal(canvas[:, :, 8:], right[:, :, 4:])
    np.testing.assert_array_equal(canvas[:, :, 4:8], np.maximum(left[:, :, 4:], right[:, :, :4]))


def test_multidigits_data_labels_match_the_digits_on_the_canvas(multidigits):
    """Each canvas is the overlay of two sklearn digits carrying the pair's labels."""
    from sklearn.datasets import load_digits

    train, test = multidigits.make_data()
    assert train.x.shape == (multidigits.NUM_TRAIN_PAIRS, 8, 12)
    assert test.y.shape == (multidigits.NUM_TEST_PAIRS, 2)
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    # The left-only columns 0-3 identify a digit of the right class.
    for canvas, labels in zip(test.x[:20], test.y[:20], strict=True):
        match = np.all(images[:, :, :4] == canvas[None, :, :4], axis=(1, 2))
        assert labels[0] in digits.target[match]
        match = np.all(images[:, :, 4:] == canvas[None, :, 8:], axis=(1, 2))
        assert labels[1] in digits.target[match]


def test_multidigits_main_trains_above_chance(multidigits, tmp_path):
    """One epoch of mean + Adam: both tasks well above chance (10 %); outputs written."""
    runs = multidigits.main(
        ["--methods", "mean", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)]
    )
    acc = runs["mean"][0].test_accuracy[-1]
    assert acc.shape == (2,) and np.all(acc > 0.3), acc
    assert np.isfinite(runs["mean"][0].ms_per_step)
    assert "| mean |" in (tmp_path / "multidigits.md").read_text()
    assert 1_000 < (tmp_path / "multidigits_curves.png").stat().st_size < MAX_PNG_BYTES


# ---------------------------------------------------------------------------
# Recipes.
# ---------------------------------------------------------------------------


def test_recipe_nnx_and_linen_steps_reduce_the_losses(recipes):
    """Both train steps lower the mean of the first and last 5 losses of each task."""
    _, optimizer, nnx_losses = recipes.nnx_train_step(mtl_optax.mean(num_tasks=2), steps=40)
    state, linen_losses = recipes.linen_train_step(mtl_optax.mean(num_tasks=2), steps=40)
    for losses in (nnx_losses, linen_losses):
        assert losses.shape == (40, 2)
        assert np.all(losses[-5:].mean(0) < losses[:5].mean(0))
    np.testing.assert_allclose(recipes.log_weights(optimizer.opt_state), [0.5, 0.5])
    np.testing.assert_allclose(recipes.log_weights(state.opt_state), [0.5, 0.5])


def test_recipe_sdmgrad_with_cross_gramian_runs(recipes):
    """The stochastic SDMGrad step: finite losses, weights from its state."""
    state, losses = recipes.sdmgrad_stochastic_step(steps=5)
    assert losses.shape == (5, 2) and np.all(np.isfinite(losses))
    weights = recipes.log_weights(state.opt_state)
    assert weights.shape == (2,) and np.all(np.isfinite(weights))


def test_piecewise_constant_uses_each_value_in_its_steps(recipes):
    """Steps 0-1 equal cagrad(alpha=0)'s update, steps 2+ cagrad(alpha=0.5)'s, jitted."""
    tx = recipes.piecewise_constant(mtl_optax.cagrad, "alpha", [0.0, 0.5], [2], num_tasks=2)
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
    update = jax.jit(tx.update)
    state = tx.init(params)
    expected = {
        alpha: mtl_optax.cagrad(alpha=alpha, num_tasks=2).update(g, None, params)[0]["w"]
        for alpha in (0.0, 0.5)
    }
    assert not np.allclose(expected[0.0], expected[0.5])
    for step in range(4):
        u, state = update(g, state, params)
        np.testing.assert_allclose(u["w"], expected[0.0 if step < 2 else 0.5], rtol=1e-6)
        assert int(state.index) == (0 if step < 2 else 1)


def test_piecewise_constant_rejects_bad_boundaries(recipes):
    with pytest.raises(ValueError, match="boundaries"):
        recipes.piecewise_constant(mtl_optax.cagrad, "alpha", [0.0, 0.5], [1, 2])
    with pytest.raises(ValueError, match="increase"):
        recipes.piecewise_constant(mtl_optax.cagrad, "alpha", [0.0, 0.2, 0.5], [3, 3])


def test_inject_hyperparams_check_accepts_a_factory_without_numeric_arguments(recipes):
    """``mean`` has no hyperparameter but num_tasks (static): inject_hyperparams works."""
    assert recipes.inject_hyperparams_works(mtl_optax.mean) is True


def test_recipe_schedule_ramps_alpha_with_inject_hyperparams(recipes):
    """optax.inject_hyperparams ramps CAGrad's alpha from 0 to 0.5 in a jitted step."""
    optimizer, alphas = recipes.scheduled_hyperparameter(steps=10)
    np.testing.assert_allclose(alphas, np.linspace(0.0, 0.5, 10), rtol=1e-6, atol=1e-7)
    assert recipes.log_weights(optimizer.opt_state).shape == (2,)


# ---------------------------------------------------------------------------
# The demo (every method on one problem).
# ---------------------------------------------------------------------------


def test_demo_builds_every_registered_method(demo):
    """No method is skipped: each one builds with the demo's hyperparameters at K = 3."""
    train, _ = demo.make_data(0)
    hparams = demo.method_hparams(train, 0)
    for name in mtl_optax.available():
        method = demo.build_method(name, hparams)
        assert callable(method.update), name


def test_demo_main_prints_a_finite_row_per_method(demo, capsys):
    """Two methods, 30 steps: a table row each, finite test errors, nothing skipped."""
    demo.main(["--methods", "mean,mgda", "--steps", "30"])
    out = capsys.readouterr().out
    assert "skipping" not in out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    for name in ("mean", "mgda"):
        cells = [c.strip() for c in rows[name].split("|")[1:5]]  # the 3 tasks and their mean
        values = np.array([float(c) for c in cells])
        assert np.all(np.isfinite(values)) and np.all(values > 0), rows[name]


def test_demo_rejects_unknown_methods_and_zero_steps(demo):
    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "mean,not_a_method"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])


# ---------------------------------------------------------------------------
# Representation gradients (rep_grad with MGDA-UB).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", [None, "l2", "loss+"])
def test_representation_example_lowers_the_summed_loss(representation_gradients, normalization):
    """40 steps of rep_grad lower the sum of the 3 losses; MGDA-UB's weights are convex."""
    ex = representation_gradients
    method = (
        mtl_optax.mean()
        if normalization is None
        else mtl_optax.mgda_ub(normalization, num_tasks=ex.K)
    )
    first, _ = ex.train(method, steps=1)
    last, state = ex.train(method, steps=40)
    assert last.shape == (ex.K,) and np.all(np.isfinite(last))
    assert float(np.sum(last)) < 0.9 * float(np.sum(first))
    if normalization is not None:
        w = np.asarray(state.method.weights)
        assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-5, w


def test_representation_example_main_prints_three_rows(representation_gradients, capsys):
    representation_gradients.main(["--steps", "5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == [
        "mean",
        "mgda_ub (l2)",
        "mgda_ub (loss+)",
    ]
