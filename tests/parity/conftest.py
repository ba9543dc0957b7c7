"""Harness for the torch parity tests: references, float64 mode, shared inputs.

The parity tests compare mtl_optax with the PyTorch implementations it follows
(TorchJD, ConFIG's ``conflictfree``, RotoGrad, LibMTL). Those references are
test dependencies (the ``test`` extra in ``pyproject.toml``):

* Locally, a missing reference skips the tests that need it.
* In CI (environment variable ``CI=true``), a missing reference is a test
  failure with the command that installs it: parity must never be silently
  skipped there.

Test modules use the helpers through ``from .conftest import ...`` (this
directory is a package, so the name cannot clash with another ``conftest``) or
through the fixtures of the same names.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# How to install each reference; mirrors the `test` extra of pyproject.toml.
_TORCH_CPU = "pip install torch==2.13.0  (the CPU build; before any package that needs torch)"
_INSTALL = {
    "torch": _TORCH_CPU,
    "torchjd": "pip install 'torchjd[full]==0.18.0'",
    "conflictfree": "pip install conflictfree==0.1.8",
    "rotograd": "pip install rotograd==0.1.6 geotorch==0.3.0",
    "geotorch": "pip install geotorch==0.3.0",
    "LibMTL": "pip install --no-deps LibMTL==1.1.5  (torchvision is stubbed by the tests)",
    "scipy": "pip install 'scipy>=1.11'",
}


def in_ci() -> bool:
    """Whether missing references must fail (``CI=true``) rather than skip."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _missing(module_name: str, error: BaseException) -> None:
    top = module_name.split(".")[0]
    how = _INSTALL.get(top, f"pip install {top}")
    message = (
        f"parity reference {module_name!r} is not importable"
        f" ({type(error).__name__}: {error}). Install it with:\n    {how}\n"
        "(first install the CPU build of torch: "
        f"{_TORCH_CPU}; or install everything with pip install -e '.[test]')."
    )
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_reference(module_name: str) -> types.ModuleType:
    """Imports and returns the reference module ``module_name``.

    When it cannot be imported: ``pytest.skip`` locally (also at module level),
    ``pytest.fail`` with install instructions when ``CI=true``.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        _missing(module_name, error)
        raise  # unreachable: skip and fail raise.


class _Reference:
    """Stands in for a reference module, imported by :func:`require_reference` at first use.

    Reading, setting or deleting an attribute acts on the module itself (so
    ``monkeypatch.setattr(torch, "rand", fake)`` patches torch for the reference).
    """

    __slots__ = ("_reference_name",)

    def __init__(self, module_name: str) -> None:
        object.__setattr__(self, "_reference_name", module_name)

    def _module(self) -> types.ModuleType:
        return require_reference(self._reference_name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._module(), name)

    def __repr__(self) -> str:
        return f"<parity reference {self._reference_name!r}, imported at first use>"


def reference(module_name: str) -> Any:
    """The reference module ``module_name``, imported when a test first uses it.

    Bound at module level (``torch = reference("torch")``), it keeps collection
    free of torch imports, and a missing reference skips (locally) or fails
    (``CI=true``) each test that uses it, as :func:`require_reference` does,
    rather than raising a collection error that would stop the whole session.
    """
    return _Reference(module_name)


# ---------------------------------------------------------------------------
# LibMTL without torchvision.
#
# LibMTL 1.1.5 imports torchvision when the package is imported:
# LibMTL/__init__.py -> LibMTL/model/__init__.py -> LibMTL/model/resnet.py does
# `from torchvision.models.utils import load_state_dict_from_url` (the only
# torchvision import in the package; checked with grep). torchvision is not a
# dependency of the weighting strategies we compare with (LibMTL/weighting/*
# use torch, numpy and scipy only), and it has no CPU wheel matching torch
# 2.13 here, so LibMTL is installed with --no-deps. When the real torchvision
# cannot be imported we put minimal stub modules in sys.modules, just long
# enough to import LibMTL, then remove them again so no other code mistakes
# them for torchvision. The stubbed function raises if it is ever called.
# ---------------------------------------------------------------------------

_TORCHVISION_STUBS = ("torchvision", "torchvision.models", "torchvision.models.utils")


def _load_state_dict_from_url_stub(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "torchvision stub (tests/parity/conftest.py): load_state_dict_from_url is"
        " not available; install the real torchvision to use LibMTL's pretrained models."
    )


@contextlib.contextmanager
def _torchvision_stubs() -> Iterator[None]:
    try:
        importlib.import_module("torchvision")
        real = True
    except Exception:  # ImportError, or e.g. a RuntimeError from a torch/torchvision mismatch.
        real = False
    if real:
        yield
        return
    previous = {name: sys.modules.get(name) for name in _TORCHVISION_STUBS}
    stubs = {}
    for name in _TORCHVISION_STUBS:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so `import torchvision.models.utils` resolves.
        module.__mtl_optax_stub__ = True
        stubs[name] = module
    stubs["torchvision"].models = stubs["torchvision.models"]
    stubs["torchvision.models"].utils = stubs["torchvision.models.utils"]
    stubs["torchvision.models.utils"].load_state_dict_from_url = _load_state_dict_from_url_stub
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_libmtl() -> types.ModuleType:
    """Imports and returns ``LibMTL``, stubbing torchvision if it is missing.

    A missing LibMTL skips locally and fails with ``CI=true`` (see
    :func:`require_reference`).
    """
    if sys.modules.get("LibMTL") is not None:
        return sys.modules["LibMTL"]
    require_reference("torch")
    with _torchvision_stubs():
        libmtl = require_reference("LibMTL")
    require_reference("LibMTL.weighting")
    return libmtl


@pytest.fixture(name="require_reference")
def _require_reference_fixture():
    """The :func:`require_reference` helper, as a fixture."""
    return require_reference


@pytest.fixture(name="import_libmtl")
def _import_libmtl_fixture():
    """The :func:`import_libmtl` helper, as a fixture."""
    return import_libmtl


@pytest.fixture(name="libmtl")
def _libmtl_fixture() -> types.ModuleType:
    """The imported LibMTL package (torchvision stubbed if missing)."""
    return import_libmtl()


# ---------------------------------------------------------------------------
# float64.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def torch_default_dtype(dtype: Any) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block, restored after."""
    torch = require_reference("torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def torch_default_float64() -> contextlib.AbstractContextManager[None]:
    """torch's default dtype set to float64 inside the block, restored after.

    LibMTL allocates its gradient buffers (and torch its new tensors) with the
    default dtype, float32: the float64 parity tests run the references inside.
    """
    return torch_default_dtype(require_reference("torch").float64)


@contextlib.contextmanager
def jax_float64() -> Iterator[None]:
    """Enables float64 in JAX inside the block and restores the previous value."""
    previous = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs the test with ``jax_enable_x64`` on (parity is checked in float64)."""
    with jax_float64():
        yield


# ---------------------------------------------------------------------------
# Shared inputs and conversions.
# ---------------------------------------------------------------------------


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (or array-like) as a numpy array, dtype preserved."""
    if hasattr(tensor, "detach"):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def random_jacobian(
    seed: int, num_tasks: int, num_params: int, *, scales: Any = None
) -> np.ndarray:
    """A seeded ``(K, P)`` float64 Jacobian with standard normal entries.

    ``scales`` (optional, shape ``[K]``) multiplies row ``k`` by ``scales[k]``.
    The same ``seed`` gives the same matrix, so both sides see the same input.
    """
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((num_tasks, num_params))
    if scales is not None:
        jac = jac * np.asarray(scales, np.float64)[:, None]
    return jac


def jacobian_to_tree(jac: np.ndarray) -> dict[str, jax.Array]:
    """Splits a ``(K, P)`` Jacobian into a pytree of stacked task gradients.

    Leaves (in ``jax.tree_util`` order): ``"a_kernel"`` of shape ``(K, a, 3)``,
    ``"b_bias"`` of shape ``(K, c)`` and ``"c_scale"`` of shape ``(K,)`` (a
    scalar parameter); leaves that would be empty for small ``P`` are left out.
    Concatenating the row-major flattening of the leaves gives ``jac`` back
    (:func:`tree_to_matrix`). Arrays take JAX's current default precision, so
    call it with float64 enabled.
    """
    jac = np.asarray(jac)
    k, p = jac.shape
    tree: dict[str, jax.Array] = {}
    rest = p - 1 if p >= 3 else p
    a = (rest // 2) // 3
    start = 0
    if a > 0:
        tree["a_kernel"] = jnp.asarray(jac[:, : 3 * a].reshape(k, a, 3))
        start = 3 * a
    tree["b_bias"] = jnp.asarray(jac[:, start : start + rest - 3 * a])
    if p >= 3:
        tree["c_scale"] = jnp.asarray(jac[:, p - 1])
    assert np.array_equal(tree_to_matrix(tree), jac)
    return tree


def tree_to_vector(tree: Any) -> np.ndarray:
    """Concatenation of the row-major flattening of the leaves of ``tree``."""
    return np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree_util.tree_leaves(tree)])


def tree_to_matrix(tree: Any) -> np.ndarray:
    """Stacked task gradients back to the ``(K, P)`` Jacobian."""
    leaves = jax.tree_util.tree_leaves(tree)
    k = np.shape(leaves[0])[0]
    return np.concatenate([np.asarray(x).reshape(k, -1) for x in leaves], axis=1)


def params_like(tree: Any) -> Any:
    """Zero parameters matching stacked task gradients (the task axis removed)."""
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype), tree)


def assert_combination_close(
    actual: Any, expected: Any, weights: Any, jac: np.ndarray, *, rtol: float = 1e-12
) -> None:
    """Checks ``actual ≈ expected ≈ weights @ jac`` entrywise, relative to the data.

    Both sides compute the same float64 dot products ``sum_k w_k J_kj`` in
    different summation orders, so they agree to ``K * eps`` of
    ``sum_k |w_k| |J_kj|`` (the classical dot-product rounding bound, eps =
    2.2e-16). A plain relative tolerance on the result would be meaningless for
    entries that cancel to ~0 (e.g. opposite gradients), so the tolerance is
    ``rtol * sum_k |w_k| |J_kj|`` with rtol = 1e-12: about 1e2-1e4 times the
    rounding bound for K <= 40, and far below any real discrepancy (a wrong
    weight changes the result by a fraction of the scale itself).
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(np.asarray(weights, np.float64)) @ np.abs(jac)
    bound = rtol * scale
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if np.any(bad):
        i = int(np.argmax(np.where(bad, err - bound, -np.inf)))
        raise AssertionError(
            f"{int(bad.sum())}/{bad.size} entries differ beyond rtol={rtol} of"
            f" sum_k |w_k||J_kj|; worst at {i}: actual={actual[i]!r},"
            f" expected={expected[i]!r}, |diff|={err[i]:.3e}, bound={bound[i]:.3e}"
        )


# Every case that edge_jacobian knows (without ``extra``).
EDGE_CASE_NAMES = (
    "K1",
    "identical",
    "opposite",
    "orthogonal",
    "collinear",
    "zero_task",
    "all_zero",
    "magnitudes",
    "tiny_vs_huge",
)


def edge_jacobian(
    name: str,
    *,
    seed: int,
    num_params: int = 301,
    orthogonal_scale: float = 1.0,
    magnitudes_seed: int = 11,
    extra: dict[str, Any] | None = None,
) -> np.ndarray:
    """The ``(K, P)`` float64 Jacobian of an edge case of the issue tracker.

    Cases: ``K1``; ``identical``, ``opposite``, ``orthogonal`` (K = 2);
    ``collinear`` (c = 1, 2.5, -0.5); ``zero_task`` (row 1 of three is zero);
    ``all_zero``; ``magnitudes`` (rows scaled 1e-8, 1, 1e4); ``tiny_vs_huge``
    (1e-8 against 1e4). Two base vectors ``g1, g2`` are drawn first from
    ``default_rng(seed)``; ``extra`` maps further case names to
    ``fn(rng, num_params)``, called with that generator after those draws.

    Raises:
      AssertionError: ``name`` is not a known case.
    """
    p = num_params
    rng = np.random.default_rng(seed)
    g1, g2 = rng.standard_normal(p), rng.standard_normal(p)
    if extra and name in extra:
        return extra[name](rng, p)
    if name == "K1":
        return g1[None]
    if name == "identical":
        return np.stack([g1, g1])
    if name == "opposite":
        return np.stack([g1, -g1])
    if name == "orthogonal":
        return np.stack([g1, orthogonal_scale * (g2 - (g1 @ g2) / (g1 @ g1) * g1)])
    if name == "collinear":
        return np.stack([g1, 2.5 * g1, -0.5 * g1])
    if name == "zero_task":
        jac = rng.standard_normal((3, p))
        jac[1] = 0.0
        return jac
    if name == "all_zero":
        return np.zeros((3, p))
    if name == "magnitudes":
        return random_jacobian(magnitudes_seed, 3, p, scales=[1e-8, 1.0, 1e4])
    if name == "tiny_vs_huge":
        return random_jacobian(12, 2, p, scales=[1e-8, 1e4])
    raise AssertionError(f"unknown edge case {name!r}")
