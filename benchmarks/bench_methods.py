"""Times every mtl_optax method beside the engine floor and the PyTorch references.

For J of shape (K, P) (float32), for each method and size it measures, in one run
and on the same machine:

* ``jax``: the method's jitted ``update`` on the stacked gradients ``{"J": J}``,
  its state donated and passed from one call to the next (as in a training loop);
* ``floor``: the engine floor on the same J — one Gramian plus one weighted
  combination (``mtl_optax.gramian`` + ``mtl_optax.combine``), jitted; every
  Gramian-based method must do at least this much work. It is timed again for
  every method, in bursts of calls interleaved with the method's;
* the PyTorch references that implement the same method (torchjd,
  conflictfree, LibMTL where it takes a plain matrix), on the same J, in the
  same interleaved bursts.

The functions of a row are timed in rounds: each round runs a short burst of
calls of each (1 to 5 calls, about 25 ms), in a shuffled order, and at least 5
rounds run. Times are medians over the rounds; the ratios the table prints,
``jax / floor`` (target: <= 1.5 at P >= 1e6) and ``best torch / jax``
(target: > 1, i.e. faster than the fastest reference), are medians of the
ratios taken round by round, so that each compares calls made seconds apart
(in the JSON rows: ``paired``). Ratios of the medians, as runs before
2026-11-23 reported, let a slow minute of a shared machine that hit one
function's burst but not the other's become the ratio.

Usage::

  python benchmarks/bench_methods.py                  # K in {2,10,40}, P in {1e5,1e6,1e7}
  python benchmarks/bench_methods.py --quick          # K in {2,10}, P in {1e5,1e6}
  python benchmarks/bench_methods.py --methods mgda,cagrad --no-torch --json out.json
  python benchmarks/bench_methods.py --P 1e7 --heap-allocator   # no page faults (see below)
  python benchmarks/bench_methods.py --sync-dispatch    # JAX runs each call on the caller's thread
  python benchmarks/bench_methods.py --settle-ms 30      # untimed calls for 30 ms per burst

``--heap-allocator`` makes glibc ``malloc`` reuse freed memory for large blocks
instead of mapping fresh pages for every new output (``use_heap_allocator``):
at ``P = 1e7`` the first-touch page faults of a fresh 40 MB output otherwise
cost more than the arithmetic, in torch and in JAX alike, and make the times
bimodal from run to run.

``--sync-dispatch`` sets ``jax_cpu_enable_async_dispatch`` to ``False``: JAX
then runs each call on the calling thread, as torch runs its eager ops. By
default (asynchronous dispatch) a call that is not trivially cheap is handed
to a worker thread while the caller waits for its result; on this 2-vCPU VM
that handoff costs the waiting thread a wake-up, 50 to 80 us per blocked call
(the engine floor at K = 2, P = 1e5: 0.158 ms asynchronous, 0.082 ms
synchronous; 2 x 1e6: 0.68 against 0.48 ms). That is a cost of calling a
jitted function on its own and waiting for it, not of the method: inside a
jitted training step it is paid once per step, whatever the step contains.
Rows timed this way are marked ``(sync)``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

# Hyperparameters for methods whose factory has required arguments.
HPARAMS: dict[str, Callable[[int], dict[str, Any]]] = {
    "constant": lambda k: {"weights": np.linspace(0.5, 1.5, k).tolist()},
    "fairgrad": lambda k: {"alpha": 2.0},
    "krum": lambda k: {"n_byzantine": (k - 3) // 2},
    "trimmed_mean": lambda k: {"trim_number": k // 4},
}
# The fewest tasks a method accepts (Krum scores need K >= n_byzantine + 3):
# smaller K are left out of its rows.
MIN_TASKS: dict[str, int] = {"krum": 3}


def _time(fn: Callable[[], Any], repeats: int, budget_s: float) -> float:
    """Median wall time (ms) of ``fn`` after one warm-up call."""
    return _time_interleaved([fn], repeats, budget_s, burst=1)[0]


# A burst of calls of one function lasts about this long (at most 5 calls, at
# least 1): short calls are timed in bursts of 5, calls of 25 ms and more one
# at a time, so that even the slowest sizes get several rounds.
BURST_S = 0.025
# The fewest rounds of a side-by-side timing (3 when its budget runs out):
# the paired ratios are medians over the rounds.
MIN_ROUNDS = 5


def _time_rounds(
    fns: list[Callable[[], Any]],
    repeats: int,
    budget_s: float,
    burst: int | None = None,
    settle_s: float = 0.0,
    min_rounds: int = MIN_ROUNDS,
) -> list[list[float]]:
    """Wall times (ms) of several functions timed side by side, round by round.

    Every round runs a burst of ``burst`` calls of each function in turn, in
    an order shuffled every round (with a fixed seed, so that none always
    follows the same neighbour: in a fixed order the same Gramian read 30 %
    slower right after a long XLA contraction than before it). Rounds go on
    until every function has ``repeats`` timed calls and ``min_rounds``
    rounds have run, or until ``budget_s`` seconds have passed and at least 3
    rounds have. ``burst`` defaults to about ``BURST_S`` of calls (1 to 5),
    from the time of a second warm-up call of the slowest function.

    Each burst starts with untimed calls, at least one and for ``settle_s``
    seconds, so that no timed call shares the cores with the previous
    function's threads still spinning (torch's OpenMP workers spin for a while
    after each parallel region: at K = 40, P = 1e5 the engine floor's first
    three calls after a torchjd burst took 7.4, 6.5 and 5.3 ms, and 4.2–4.5 ms
    from the fifth on; 5.4 ms for the first with ``OMP_WAIT_POLICY=PASSIVE``).

    Returns, for each round, the median time of each function's burst in that
    round: ``rounds[r][i]`` for function ``i``. Ratios taken round by round
    (:func:`paired_ratio`) compare calls made within seconds of each other, so
    a slow minute of a shared machine does not turn into a ratio.
    """
    slowest = 0.0
    for fn in fns:
        jax.block_until_ready(fn())  # compiles
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        slowest = max(slowest, time.perf_counter() - t0)
    if burst is None:
        burst = max(1, min(5, int(BURST_S / max(slowest, 1e-9))))
    rounds: list[list[float]] = []
    order = list(range(len(fns)))
    rng = random.Random(0)
    start = time.perf_counter()
    while len(rounds) * burst < repeats or len(rounds) < min_rounds:
        rng.shuffle(order)
        this = [0.0] * len(fns)
        for i in order:
            fn = fns[i]
            settle_start = time.perf_counter()
            jax.block_until_ready(fn())
            while time.perf_counter() - settle_start < settle_s:
                jax.block_until_ready(fn())
            calls = []
            for _ in range(burst):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                calls.append(time.perf_counter() - t0)
            this[i] = 1e3 * statistics.median(calls)
        rounds.append(this)
        if time.perf_counter() - start > budget_s and len(rounds) >= 3:
            break
    return rounds


def _time_interleaved(
    fns: list[Callable[[], Any]],
    repeats: int,
    budget_s: float,
    burst: int | None = None,
    settle_s: float = 0.0,
) -> list[float]:
    """Median wall times (ms) of several functions timed side by side
    (:func:`_time_rounds`)."""
    return round_medians(_time_rounds(fns, repeats, budget_s, burst, settle_s))


def round_medians(rounds: list[list[float]]) -> list[float]:
    """Each function's median time (ms) over the rounds of :func:`_time_rounds`."""
    return [statistics.median(r[i] for r in rounds) for i in range(len(rounds[0]))]


def paired_ratio(rounds: list[list[float]], num: int, den: int) -> float:
    """Median over the rounds of ``rounds[r][num] / rounds[r][den]``."""
    return statistics.median(r[num] / r[den] for r in rounds)


def use_heap_allocator() -> None:
    """Makes glibc serve every allocation from its heap and never give it back.

    By default glibc ``malloc`` maps every block above 32 MB (its largest
    ``mmap`` threshold) freshly from the kernel and unmaps it when freed, so a
    call that returns a new 40 MB array (``P = 1e7`` float32) first-touches
    ~10k pages: the page faults then cost more than the arithmetic, in both
    libraries (torch's ``w @ J`` on 2 x 1e7: 23 ms into a new tensor, 5 ms
    into a preallocated one). ``M_MMAP_MAX = 0`` and a trim threshold of 2 GB
    (what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set from the
    environment) make freed blocks reused instead, for JAX's and torch's
    buffers alike (both allocate through ``malloc`` on CPU).
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed: --heap-allocator needs glibc")


def torch_references(name: str, k: int, device: str = "cpu") -> dict[str, Callable[[Any], Any]]:
    """Callables ``J_torch -> aggregated vector`` of the references for ``name``.

    ``device`` is where ``J_torch`` lives (``"cpu"`` or ``"cuda"``): the
    references that hold tensors of their own (torchjd's ``Constant``, LibMTL's
    losses) get them there.
    """
    try:
        import torch
    except ImportError:
        return {}
    refs: dict[str, Callable[[Any], Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import torchjd.aggregation as A

            tjd = {
                "mean": A.Mean,
                "sum": A.Sum,
                "rlw": A.Random,
                "mgda": A.MGDA,
                "cagrad": lambda: A.CAGrad(c=0.5),
                "pcgrad": A.PCGrad,
                "gradvac": A.GradVac,
                "graddrop": A.GradDrop,
                "imtl_g": A.IMTLG,
                "conflict_free": A.ConFIG,
                "config": A.ConFIG,
                "sdmgrad": lambda: A.GramianWeightedAggregator(A.SDMGradWeighting()),
                # MoDo's weighting takes any K x K matrix: here the Gramian, as
                # mtl_optax's default without cross_gramian.
                "modo": lambda: A.GramianWeightedAggregator(A.MoDoWeighting()),
                # Stateful like mtl_optax's (the EMA of the squared norms),
                # called on the same J at every repeat.
                "pcd": A.PCD,
                # Stateful like mtl_optax's (a K x P state from the squared
                # gradients), called on the same J at every repeat; with
                # mtl_optax's default warmup.
                "excess_mtl": lambda: A.ExcessMTL(n_warmup_steps=1),
                "cr_mogm": lambda: A.GramianWeightedAggregator(
                    A.CRMOGMWeighting(A.MGDAWeighting())
                ),
                # TorchJD's epsilons (norm_eps = reg_eps = 1e-4) regularise the same
                # K quadratic programs that mtl_optax solves exactly by default.
                "upgrad": A.UPGrad,
                "dualproj": A.DualProj,
                "aligned_mtl": A.AlignedMTL,
                "fairgrad": lambda: A.FairGrad(alpha=2.0),
                "nash_mtl": lambda: A.NashMTL(n_tasks=k),
                "krum": lambda: A.Krum(n_byzantine=(k - 3) // 2),
                "trimmed_mean": lambda: A.TrimmedMean(trim_number=k // 4),
            }
            if name == "constant":
                refs["torchjd"] = A.Constant(torch.linspace(0.5, 1.5, k, device=device))
            elif name in tjd:
                refs["torchjd"] = tjd[name]()
        except ImportError:
            pass
        try:
            import conflictfree.grad_operator as cf

            if name in ("conflict_free", "config"):
                refs["conflictfree"] = lambda J: cf.ConFIG_update(J)
            elif name == "pcgrad":
                refs["conflictfree"] = cf.PCGradOperator().calculate_gradient
            elif name == "imtl_g":
                refs["conflictfree"] = cf.IMTLGOperator().calculate_gradient
        except ImportError:
            pass
        refs.update(libmtl_references(name, k, device))
    return refs


# LibMTL 1.1.5 weightings that act on the stacked task gradients of the shared
# parameters (with rep_grad=False), and their arguments at our defaults. EW and
# RLW only weight the losses before one backward pass, GradDrop needs
# rep_grad=True and GradNorm its trainer's loss history: not timed on a matrix.
_LIBMTL = {
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "pcgrad": ("PCGrad", {}),
    "gradvac": ("GradVac", {"beta": 0.5}),
    "imtl_g": ("IMTL", {}),
    "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}),  # LibMTL hard-codes K = 3
}


def libmtl_references(name: str, k: int, device: str = "cpu") -> dict[str, Callable[[Any], Any]]:
    """LibMTL's weighting on a given J: ``J_torch -> aggregated vector``.

    LibMTL's weightings compute the task gradients of the model's shared
    parameters inside ``backward`` (``_get_grads`` / ``_compute_grad``) and
    write the result into their ``.grad`` (``_reset_grad``). Here those three
    hooks are replaced so that ``backward`` receives J itself and returns the
    combined vector: the time is LibMTL's method on J, without the K backward
    passes that produce J in training. LibMTL imports torchvision at import
    time; it is stubbed as in ``tests/parity/conftest.py``.
    """
    if name not in _LIBMTL or (name == "cagrad" and k != 3):
        return {}
    try:
        import torch

        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        from tests.parity.conftest import import_libmtl

        libmtl = import_libmtl()
    except (Exception, pytest.skip.Exception):
        # LibMTL (or torch) not installed, or not importable (import_libmtl
        # skips: LibMTL 1.1.5 needs torchvision.models.utils, gone from
        # torchvision 0.26): no LibMTL column.
        return {}
    cls_name, kwargs = _LIBMTL[name]
    weighting = getattr(libmtl.weighting, cls_name)()
    weighting.task_num, weighting.device, weighting.rep_grad = k, torch.device(device), False
    weighting.init_param()
    losses = torch.linspace(0.5, 2.0, k, device=device)
    out: dict[str, Any] = {}

    def run(J: Any) -> Any:
        weighting._compute_grad_dim = lambda: None
        weighting._compute_grad = lambda losses, mode, rep_grad=False: J
        weighting._get_grads = lambda losses, mode="backward": J
        weighting._reset_grad = lambda new_grads: out.__setitem__("update", new_grads)
        weighting.backward(losses, **kwargs)
        return out["update"]

    return {"libmtl": run}


def floor_fn(J: jax.Array) -> jax.Array:
    """Gramian + combination, the work every Gramian-based method does."""
    tree = {"J": J}
    g = mtl_optax.gramian(tree)
    w = jax.nn.softmax(jnp.diagonal(g) / (1.0 + jnp.max(jnp.abs(g))))
    return mtl_optax.combine(tree, w)["J"]


def run(
    ks,
    ps,
    methods,
    use_torch: bool,
    repeats: int,
    budget_s: float,
    settle_s: float = 0.0,
    on_row: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Times every method at every size; ``on_row(rows)`` after each row (the
    rows so far), so that a run cut short keeps what it measured."""
    rows = []
    floor = jax.jit(floor_fn)
    noop = jax.jit(lambda J: J[0, 0])
    for p in ps:
        for k in ks:
            J = jax.random.normal(jax.random.key(0), (k, p), jnp.float32)
            value = jnp.linspace(0.5, 2.0, k)
            # The cost of calling a jitted function at all (argument handling,
            # dispatch), which every jax time below includes.
            noop_ms = _time(lambda J=J: noop(J), repeats, budget_s)
            J_torch, torch_device, torch_sync = None, "cpu", lambda: None
            if use_torch:
                import torch

                torch.set_num_threads(max(1, torch.get_num_threads()))
                # The references run where JAX runs: on the GPU when JAX's
                # default backend is one (and torch sees a CUDA device), each
                # call then synchronised, as ``block_until_ready`` waits for JAX.
                if jax.default_backend() == "gpu" and torch.cuda.is_available():
                    torch_device, torch_sync = "cuda", torch.cuda.synchronize
                J_torch = torch.from_numpy(np.array(J)).to(torch_device)
            for name in methods:
                if k < MIN_TASKS.get(name, 1):
                    continue
                kwargs = {"num_tasks": k, **HPARAMS.get(name, lambda k: {})(k)}
                tx = mtl_optax.get(name, **kwargs)
                state = tx.init({"J": jnp.zeros((p,), jnp.float32)})
                # The state is donated and threaded from call to call, as in a
                # training loop: a method whose state holds K x P momenta
                # (m_conflict_free) then updates it in place instead of
                # allocating a new K x P buffer every call.
                step = jax.jit(
                    lambda J, s, tx=tx, value=value: tx.update({"J": J}, s, value=value),
                    donate_argnums=1,
                )
                holder = [state]

                def call(step=step, J=J, holder=holder):
                    out, holder[0] = step(J, holder[0])
                    return out, holder[0]

                row = {"method": name, "K": k, "P": p, "dispatch_ms": noop_ms}
                # The floor and the torch references are timed beside each method
                # (interleaved), so that their ratios are not those of two different
                # minutes of a noisy machine. A reference that fails on its first
                # call is reported, not fatal.
                refs = {}
                if J_torch is not None:
                    for ref, fn in torch_references(name, k, torch_device).items():

                        def ref_call(fn=fn, J_torch=J_torch, sync=torch_sync):
                            out = fn(J_torch)
                            sync()
                            return out

                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                ref_call()
                        except Exception as err:
                            row[f"{ref}_error"] = f"{type(err).__name__}: {err}"[:120]
                        else:
                            refs[ref] = ref_call
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rounds = _time_rounds(
                        [call, lambda J=J: floor(J), *refs.values()],
                        repeats,
                        (2 + len(refs)) * budget_s,
                        settle_s=settle_s,
                    )
                jax_ms, floor_ms, *ref_ms = round_medians(rounds)
                row.update(jax_ms=jax_ms, floor_ms=floor_ms)
                row.update({f"{ref}_ms": ms for ref, ms in zip(refs, ref_ms, strict=True)})
                # The ratios round by round (each from calls seconds apart), then
                # their medians: what the targets are judged on.
                row["rounds"] = len(rounds)
                row["paired"] = {"floor": paired_ratio(rounds, 0, 1)} | {
                    ref: paired_ratio(rounds, 2 + i, 0) for i, ref in enumerate(refs)
                }
                rows.append(row)
                print(_format_row(row), flush=True)
                on_row(rows)
    return rows


def row_label(row: dict) -> str:
    """The method's name in a table, marked when timed with ``--heap-allocator``
    or ``--sync-dispatch``."""
    return (
        row["method"]
        + (" (heap)" if row.get("allocator") == "glibc heap" else "")
        + (" (sync)" if row.get("dispatch") == "sync" else "")
    )


OWN_MS = ("jax_ms", "floor_ms", "dispatch_ms")


def reference_times(row: dict) -> dict[str, float]:
    """The torch references' median times (ms) in ``row``, by reference."""
    return {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and k not in OWN_MS}


def ratios(row: dict) -> tuple[float, tuple[str, float] | None]:
    """``(jax / floor, (reference, its time / jax))`` of a row, the targets' ratios.

    Rows of this version hold the ratios taken round by round (``row["paired"]``,
    medians of per-round ratios); the reference is then the one with the lowest
    speed-up, i.e. the fastest. Rows of earlier runs hold only the medians, whose
    ratios are taken instead, against the reference with the lowest median.
    """
    refs = reference_times(row)
    paired = row.get("paired")
    if paired is not None:
        speedups = {ref: paired[ref] for ref in refs}
        best = min(speedups.items(), key=lambda kv: kv[1]) if speedups else None
        return paired["floor"], best
    best_ms = min(refs.items(), key=lambda kv: kv[1]) if refs else None
    best = (best_ms[0], best_ms[1] / row["jax_ms"]) if best_ms else None
    return row["jax_ms"] / row["floor_ms"], best


def _format_row(row: dict) -> str:
    refs = reference_times(row)
    ratio_floor, best = ratios(row)
    speedup = f"{best[1]:7.2f}x vs {best[0]}" if best else "      -"
    ref_text = ", ".join(f"{n} {v:.2f}" for n, v in sorted(refs.items()))
    return (
        f"| {row_label(row):<14} | {row['K']:>3} | {row['P']:>9.0e} | {row['jax_ms']:9.2f} |"
        f" {row['floor_ms']:8.2f} | {ratio_floor:6.2f} | {speedup} | {ref_text} |"
        f" {row['dispatch_ms']:.3f} |"
    )


HEADER = (
    "| method         |   K |         P |   jax ms | floor ms | /floor | best torch / jax | torch ms |"
    " jax dispatch ms |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--K", default="2,10,40", help="comma list of task counts")
    parser.add_argument("--P", default="1e5,1e6,1e7", help="comma list of parameter counts")
    parser.add_argument(
        "--methods", default="", help="comma list (default: every registered method)"
    )
    parser.add_argument("--quick", action="store_true", help="K in {2,10}, P in {1e5,1e6}")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per measurement at most")
    parser.add_argument("--json", default="", help="write the rows to this JSON file")
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=0.0,
        help="untimed calls for this long before each burst (see _time_interleaved)",
    )
    parser.add_argument(
        "--heap-allocator",
        action="store_true",
        help="glibc malloc without mmap for large blocks (see use_heap_allocator)",
    )
    parser.add_argument(
        "--sync-dispatch",
        action="store_true",
        help="run each jax call on the calling thread (jax_cpu_enable_async_dispatch=False)",
    )
    args = parser.parse_args()
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if args.heap_allocator:
        use_heap_allocator()
    if args.quick:
        args.K, args.P = "2,10", "1e5,1e6"
    ks = [int(x) for x in args.K.split(",")]
    ps = [int(float(x)) for x in args.P.split(",")]
    methods = [m for m in args.methods.split(",") if m] or mtl_optax.available()
    if "config" in methods and "conflict_free" in methods:
        methods.remove("config")  # an alias
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}),"
        f" {platform.processor() or platform.machine()}, float32, median of repeated calls"
        + (", glibc heap allocator (no mmap)" if args.heap_allocator else "")
        + (", synchronous dispatch" if args.sync_dispatch else "")
        + (f", {args.settle_ms:g} ms of untimed calls per burst" if args.settle_ms else "")
    )
    print(HEADER)
    setting = {
        "allocator": "glibc heap" if args.heap_allocator else "default",
        "dispatch": "sync" if args.sync_dispatch else "async",
        "settle_s": args.settle_ms / 1e3,
        "device": jax.devices()[0].device_kind,
    }

    def save(rows: list[dict]) -> None:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump([{**row, **setting} for row in rows], f, indent=1)

    run(
        ks,
        ps,
        methods,
        not args.no_torch,
        args.repeats,
        args.budget,
        args.settle_ms / 1e3,
        on_row=save,
    )


if __name__ == "__main__":
    main()
