"""The registry: every public method factory is listed by its lowercase name."""

import inspect

import optax
import pytest

import mtl_optax


def test_available_lists_every_registered_factory():
    names = mtl_optax.available()
    assert names == sorted(names)
    assert {"mean", "sum", "constant", "rlw"} <= set(names)
    for name in names:
        assert name == name.lower()
        # Each registered name is also the public attribute of the same factory.
        assert getattr(mtl_optax, name) is mtl_optax.registry._REGISTRY[name]


def test_every_public_factory_is_registered():
    """A public function returning a transformation must be reachable through get()."""
    registered = set(mtl_optax.registry._REGISTRY.values())
    for name in mtl_optax.__all__:
        obj = getattr(mtl_optax, name)
        if inspect.isfunction(obj) and "Transformation" in str(
            inspect.signature(obj).return_annotation
        ):
            if name in {"from_weighting", "get", "apply_if_finite"}:  # builders, wrappers
                continue
            assert obj in registered, name


def test_get_builds_with_hyperparameters():
    tx = mtl_optax.get("constant", weights=[1.0, 2.0])
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert tx.weighting.num_tasks == 2
    assert mtl_optax.get("MEAN").weighting.name == "mean"


def test_get_unknown_name_lists_the_methods():
    with pytest.raises(KeyError, match="no method named 'nope'; available: ") as err:
        mtl_optax.get("nope")
    assert ", ".join(mtl_optax.available()) in str(err.value)


def test_every_method_has_a_docstring_with_math_and_references():
    for name in mtl_optax.available():
        doc = inspect.getdoc(mtl_optax.registry._REGISTRY[name])
        assert doc and ".. math::" in doc and "References:" in doc and "Example" in doc, name


def test_available_without_aliases_lists_each_method_once():
    names = mtl_optax.available(aliases=False)
    assert "config" not in names and "conflict_free" in names
    factories = [mtl_optax.registry._REGISTRY[n] for n in names]
    assert len(set(factories)) == len(factories)
    assert set(mtl_optax.available()) - set(names) == {"config"}
