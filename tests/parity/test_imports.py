"""Every parity reference imports through the harness.

One test per reference, so that with ``CI=true`` a missing reference fails
loudly here (with the command that installs it) instead of silently skipping
the parity tests that need it.
"""

from __future__ import annotations

import sys

import pytest

from .conftest import import_libmtl, reference, require_reference


def test_torch_imports():
    torch = require_reference("torch")
    assert torch.ones(2, dtype=torch.float64).sum().item() == 2.0


def test_torchjd_imports():
    aggregation = require_reference("torchjd.aggregation")
    for name in ("Mean", "Sum", "Constant", "Random", "UPGrad", "MGDA", "PCGrad"):
        assert hasattr(aggregation, name), name


def test_conflictfree_imports():
    grad_operator = require_reference("conflictfree.grad_operator")
    assert hasattr(grad_operator, "ConFIGOperator")


def test_rotograd_with_geotorch_imports():
    geotorch = require_reference("geotorch")
    assert hasattr(geotorch, "orthogonal")
    rotograd = require_reference("rotograd")
    assert hasattr(rotograd, "RotoGrad")


def test_libmtl_imports_through_torchvision_stub():
    weighting = import_libmtl().weighting
    for name in ("EW", "RLW"):
        assert issubclass(getattr(weighting, name), weighting.AbsWeighting), name
    # The stubs are only there while LibMTL is imported; they must not leak.
    tv = sys.modules.get("torchvision")
    assert tv is None or not getattr(tv, "__mtl_optax_stub__", False)


def test_scipy_imports():
    stats = require_reference("scipy.stats")
    assert hasattr(stats, "ks_2samp")


def test_missing_reference_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        require_reference("mtl_optax_no_such_reference_module")


def test_missing_reference_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="pip install"):
        require_reference("mtl_optax_no_such_reference_module")


def test_fixture_form(require_reference):
    assert require_reference("numpy").__name__ == "numpy"


def test_reference_imports_at_first_use_and_a_missing_one_fails_there(monkeypatch):
    monkeypatch.setenv("CI", "true")
    missing = reference("mtl_optax_no_such_reference_module")  # no import yet: no failure
    with pytest.raises(pytest.fail.Exception, match="pip install"):
        missing.anything
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        missing.anything


def test_reference_reads_and_patches_the_module_itself(monkeypatch):
    import json

    ref = reference("json")
    assert ref.dumps is json.dumps
    monkeypatch.setattr(ref, "dumps", len)  # as the parity tests patch torch.rand
    assert json.dumps is len
    monkeypatch.undo()
    assert json.dumps is ref.dumps and json.dumps([1]) == "[1]"
