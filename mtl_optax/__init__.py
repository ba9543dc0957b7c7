"""mtl_optax: multi-task and multi-objective gradient methods for JAX and Optax.

Conventions
-----------
* **Task gradients.** A pytree whose every leaf has the same leading axis ``K``
  (``K`` tasks), as returned by ``jax.jacrev(f)(params)`` for ``f`` returning
  the ``K`` losses, or by :func:`mtl_optax.task_grads`.
* **Methods.** Every method is a factory ``mtl_optax.<name>(**hyperparameters)``
  returning an ``optax.GradientTransformationExtraArgs``. ``init(params)`` takes
  the parameters without the task axis; ``update(task_grads, state,
  params=None, *, value=None, **extra)`` returns one update with the
  parameters' structure and dtypes. ``value`` is the vector of the ``K`` task
  losses; a method that needs it and does not get it raises a ``ValueError``.
* **Chaining.** ``optax.chain(mtl_optax.mean(), optax.adam(1e-3))`` is an
  ordinary optax optimizer over task gradients and works in a jitted step.
* **Randomness.** Random methods take a ``key`` (int seed or PRNG key) at
  construction and split it inside their state.
* **Registry.** ``mtl_optax.get(name, **hparams)`` builds a method by its
  lowercase name; ``mtl_optax.available()`` lists them.
* **Logging.** The state of a weighting method has a field ``weights``: the
  ``[K]`` weights it used in its last step.
* **Validation.** Shapes, dtypes and tree structures are checked at trace time;
  errors name the leaf path, the shape found and the shape expected.

Example:
  >>> import jax, jax.numpy as jnp, optax, mtl_optax
  >>> def losses(p):
  ...   return jnp.stack([jnp.sum((p - 1.0) ** 2), jnp.sum((p + 1.0) ** 2)])
  >>> opt = optax.chain(mtl_optax.mean(), optax.sgd(0.1))
  >>> p = jnp.array([3.0]); state = opt.init(p)
  >>> l, g = mtl_optax.task_grads(losses, p)
  >>> u, state = opt.update(g, state, p, value=l)
  >>> optax.apply_updates(p, u)
  Array([2.4], dtype=float32)
"""

from mtl_optax import checkpoint, engine, lean, representation, solvers
from mtl_optax._aligned_mtl import AlignedMTLState, aligned_mtl
from mtl_optax._basic import (
    ConstantState,
    MeanState,
    RLWState,
    SumState,
    constant,
    mean,
    rlw,
    sum,  # noqa: A004
)
from mtl_optax._cagrad import CAGradState, cagrad
from mtl_optax._compose import ComposedTransformation, IdentityState, compose, identity
from mtl_optax._config import (
    ConflictFreeState,
    MConflictFreeState,
    conflict_free,
    m_conflict_free,
)
from mtl_optax._cr_mogm import CRMOGMState, cr_mogm
from mtl_optax._excess_mtl import ExcessMTLState, excess_mtl
from mtl_optax._fairgrad import FairGradState, NashMTLState, fairgrad, nash_mtl
from mtl_optax._graddrop import GradDropState, GradDropTransformation, graddrop
from mtl_optax._imtl import IMTLGState, imtl_g
from mtl_optax._loss_weighting import DWAState, GLSState, UWState, dwa, gls, uw
from mtl_optax._mgda import MGDAState, mgda
from mtl_optax._mgda_ub import mgda_ub
from mtl_optax._modo import MoDoState, modo
from mtl_optax._nonfinite import ApplyIfFiniteState, apply_if_finite
from mtl_optax._normalization import GradNormState, NSGDState, gradnorm, nsgd
from mtl_optax._pcd import PCDState, pcd
from mtl_optax._projection import GradVacState, PCGradState, gradvac, pcgrad
from mtl_optax._robust import KrumState, TrimmedMeanState, krum, trimmed_mean
from mtl_optax._sdmgrad import SDMGradState, cross_gramian, sdmgrad
from mtl_optax._upgrad import DualProjState, UPGradState, dualproj, upgrad
from mtl_optax.base import (
    PerTaskTransformation,
    WeightedTransformation,
    Weighting,
    WeightingFn,
    from_weighting,
)
from mtl_optax.engine import check_task_grads, combine, gramian
from mtl_optax.gradients import task_grads
from mtl_optax.registry import available, get
from mtl_optax.representation import RepGrad, RepGradState, rep_grad

config = conflict_free  # the registered alias of conflict_free

# RotoGrad needs flax (the `flax` extra): its submodule and NNX modules are
# imported on first use, so `import mtl_optax` does not import flax.
_LAZY_ROTOGRAD = ("RotateOnly", "RotoGrad", "RotoGradNorm")


def __getattr__(name: str):
    if name == "rotograd" or name in _LAZY_ROTOGRAD:
        import importlib

        module = importlib.import_module("mtl_optax.rotograd")
        return module if name == "rotograd" else getattr(module, name)
    raise AttributeError(f"module 'mtl_optax' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "ApplyIfFiniteState",
    "CAGradState",
    "CRMOGMState",
    "ComposedTransformation",
    "ConflictFreeState",
    "ConstantState",
    "DWAState",
    "DualProjState",
    "ExcessMTLState",
    "FairGradState",
    "GLSState",
    "GradDropState",
    "GradDropTransformation",
    "GradNormState",
    "GradVacState",
    "IMTLGState",
    "IdentityState",
    "KrumState",
    "MConflictFreeState",
    "MGDAState",
    "MeanState",
    "MoDoState",
    "NSGDState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "PerTaskTransformation",
    "RLWState",
    "RepGrad",
    "RepGradState",
    "SDMGradState",
    "SumState",
    "TrimmedMeanState",
    "UPGradState",
    "UWState",
    "WeightedTransformation",
    "Weighting",
    "WeightingFn",
    "aligned_mtl",
    "apply_if_finite",
    "available",
    "cagrad",
    "check_task_grads",
    "checkpoint",
    "combine",
    "compose",
    "config",
    "conflict_free",
    "constant",
    "cr_mogm",
    "cross_gramian",
    "dualproj",
    "dwa",
    "engine",
    "excess_mtl",
    "fairgrad",
    "from_weighting",
    "get",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gramian",
    "identity",
    "imtl_g",
    "krum",
    "lean",
    "m_conflict_free",
    "mean",
    "mgda",
    "mgda_ub",
    "modo",
    "nash_mtl",
    "nsgd",
    "pcd",
    "pcgrad",
    "rep_grad",
    "representation",
    "rlw",
    "sdmgrad",
    "solvers",
    "sum",
    "task_grads",
    "trimmed_mean",
    "upgrad",
    "uw",
]
