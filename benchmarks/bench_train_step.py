"""Times a whole multi-task training step in JAX beside the same step in PyTorch.

For an MLP and a small CNN with ``K`` regression tasks (one output per task,
``L_k`` the mean squared error of output ``k``), every method and every ``K``, it
times in one process, on the same machine, batch and initial weights:

* ``ours``: the jitted mtl_optax step: forward pass and the ``K`` task gradients
  with ``mtl_optax.task_grads`` (``jax.jacrev``: one forward pass, ``K``
  vectorised backward passes), then ``optax.chain(method, optax.adam(1e-3))``
  and ``optax.apply_updates``.
* ``mean step``: the jitted step on the mean loss: ``jax.value_and_grad`` of
  :math:`\\frac1K\\sum_k L_k` (one backward pass), ``optax.adam(1e-3)``,
  ``apply_updates``. The cost of ordinary single-task training.
* ``K-grad``, "K backward passes + method" in JAX: the jitted step that calls
  ``jax.grad`` ``K`` times, once per task loss ``L_k`` (``K`` separate
  ``jax.grad(lambda p: losses(p)[k])`` calls traced into the same jitted
  function; XLA may share their identical forward passes), stacks the ``K``
  gradients on a leading axis and applies the same
  ``optax.chain(method, optax.adam(1e-3))`` and ``apply_updates``. This is the
  step written the naive way, what ``ours`` must not be slower than.
* ``torch``: the same model, method and optimizer written the usual PyTorch way:
  one forward pass, ``K`` calls of ``torch.autograd.grad(losses[k], params,
  retain_graph=True)`` collecting the per-task gradients into the Jacobian
  ``J`` of shape ``[K, P]``, the method from ``torchjd.aggregation`` applied to
  ``J`` (``Mean``, ``MGDA``, ``PCGrad``, ``CAGrad(c=0.5)``, ``IMTLG``,
  ``ConFIG``), the result written to ``p.grad`` and ``torch.optim.Adam(lr=1e-3)``.
* ``torch mean``: the PyTorch step on the mean loss (one ``backward``, Adam).

mtl_optax's methods are configured as the torchjd aggregators they are timed
against (``cagrad(alpha=0.5, rescale=0)`` for ``CAGrad(c=0.5)``; defaults
elsewhere). Times are medians over repeated steps after compilation / warm-up
(each step's outputs are the next step's inputs; JAX steps donate their
parameters and optimizer state, as a training loop does).

Ratios printed per row:

* ``ours/mean``: the price of the ``K`` task gradients and the method over
  single-task training.
* ``ours/K-grad``: target <= 1.25 (ours within 1.25x of K backward passes plus
  the method).
* ``torch/ours``: target > 1 (ours faster than the PyTorch step).

The targets are printed, never asserted.

Peak memory, per step (stated in the output and the JSON):

* ``jax temp MB``: XLA's ``memory_analysis().temp_size_in_bytes`` of the
  compiled ``ours`` step: the working memory the step allocates beyond its
  arguments and outputs (exact, from the compiler; any backend).
* ``jax peak MB`` / ``torch peak MB``: on CPU, the high-water mark of the
  process's resident set size (``/proc/self/statm``, sampled every 0.5 ms by a
  thread) above its value just before a few steps, for ``ours`` and ``torch``
  (the same measure for both; ``resource.getrusage``'s ``ru_maxrss`` delta
  where ``/proc`` is missing, which only sees new process-wide peaks). On a GPU,
  ``torch.cuda.max_memory_allocated`` above the memory allocated before, and
  JAX's ``memory_stats()["peak_bytes_in_use"]`` above ``bytes_in_use`` before
  (only a new peak shows).

Usage::

  python benchmarks/bench_train_step.py                  # K in {2,4,8,16}, MLP and CNN
  python benchmarks/bench_train_step.py --quick          # K in {2,4}, small sizes, few repeats
  python benchmarks/bench_train_step.py --methods mgda,pcgrad --models mlp --json out.json
  python benchmarks/bench_train_step.py --quick --threads 1   # on a busy machine

On a machine whose cores are busy, torch's default OpenMP threads wait on each
other and its step times jump by 100x from call to call; ``--threads 1`` runs
both libraries single-threaded. Measure on a quiet machine with the default
threads for the published numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax

LEARNING_RATE = 1e-3
DEFAULT_METHODS = ("mean", "mgda", "pcgrad", "cagrad", "imtl_g", "conflict_free")

# mtl_optax methods configured as the torchjd aggregators they are timed against.
JAX_METHODS: dict[str, Callable[[int], Any]] = {
    "mean": lambda k: mtl_optax.mean(num_tasks=k),
    "mgda": lambda k: mtl_optax.mgda(num_tasks=k),
    "pcgrad": lambda k: mtl_optax.pcgrad(key=0, num_tasks=k),
    "cagrad": lambda k: mtl_optax.cagrad(alpha=0.5, rescale=0, num_tasks=k),
    "imtl_g": lambda k: mtl_optax.imtl_g(num_tasks=k),
    "conflict_free": lambda k: mtl_optax.conflict_free(num_tasks=k),
}


def torch_aggregator(name: str) -> Any:
    """The torchjd aggregator for ``name``, or None."""
    import torchjd.aggregation as A

    table = {
        "mean": A.Mean,
        "mgda": A.MGDA,
        "pcgrad": A.PCGrad,
        "cagrad": lambda: A.CAGrad(c=0.5),
        "imtl_g": A.IMTLG,
        "conflict_free": A.ConFIG,
        "config": A.ConFIG,
        "gradvac": A.GradVac,
        "graddrop": A.GradDrop,
        "sum": A.Sum,
        "rlw": A.Random,
    }
    return table[name]() if name in table else None


# ---------------------------------------------------------------------------
# Models: numpy initial weights shared by the JAX and PyTorch versions.


def model_sizes(model: str, quick: bool) -> dict[str, int]:
    if model == "mlp":
        return (
            {"batch": 64, "d_in": 32, "hidden": 128}
            if quick
            else {
                "batch": 256,
                "d_in": 64,
                "hidden": 512,
            }
        )
    return (
        {"batch": 16, "size": 16, "c1": 8, "c2": 16, "hidden": 32}
        if quick
        else {
            "batch": 64,
            "size": 32,
            "c1": 16,
            "c2": 32,
            "hidden": 64,
        }
    )


def init_weights(model: str, k: int, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Initial weights in JAX layout (dense ``[in, out]``, conv ``HWIO``), float32."""
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int) -> np.ndarray:
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    def conv(c_in: int, c_out: int) -> np.ndarray:
        return (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)

    zeros = lambda n: np.zeros(n, np.float32)
    h = sizes["hidden"]
    if model == "mlp":
        return {
            "w1": dense(sizes["d_in"], h),
            "b1": zeros(h),
            "w2": dense(h, h),
            "b2": zeros(h),
            "wh": dense(h, k),
            "bh": zeros(k),
        }
    return {
        "c1": conv(3, sizes["c1"]),
        "cb1": zeros(sizes["c1"]),
        "c2": conv(sizes["c1"], sizes["c2"]),
        "cb2": zeros(sizes["c2"]),
        "w1": dense(sizes["c2"], h),
        "b1": zeros(h),
        "wh": dense(h, k),
        "bh": zeros(k),
    }


def make_batch(model: str, k: int, sizes: dict[str, int], seed: int = 1):
    """``(x, y)`` in JAX layout (images NHWC), float32."""
    rng = np.random.default_rng(seed)
    b = sizes["batch"]
    if model == "mlp":
        x = rng.standard_normal((b, sizes["d_in"]))
    else:
        x = rng.standard_normal((b, sizes["size"], sizes["size"], 3))
    y = rng.standard_normal((b, k))
    return x.astype(np.float32), y.astype(np.float32)


def jax_outputs(model: str, p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The ``[B, K]`` outputs, one column per task."""
    if model == "mlp":
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return h @ p["wh"] + p["bh"]

    def conv(h, w, b, stride):
        out = jax.lax.conv_general_dilated(
            h, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(out + b)

    h = conv(x, p["c1"], p["cb1"], 1)
    h = conv(h, p["c2"], p["cb2"], 2)
    h = jnp.mean(h, axis=(1, 2))
    h = jax.nn.relu(h @ p["w1"] + p["b1"])
    return h @ p["wh"] + p["bh"]


def jax_task_losses(model: str) -> Callable[..., jax.Array]:
    def losses(p, x, y):
        return jnp.mean((jax_outputs(model, p, x) - y) ** 2, axis=0)

    return losses


def torch_model(model: str, weights: dict[str, np.ndarray], device: str):
    """The same network in PyTorch, with the same initial weights."""
    import torch
    from torch import nn

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            w = weights
            self.l1 = nn.Linear(*w["w1"].shape)
            self.l2 = nn.Linear(*w["w2"].shape)
            self.heads = nn.Linear(*w["wh"].shape)
            for layer, name in [(self.l1, "1"), (self.l2, "2"), (self.heads, "h")]:
                layer.weight.data = t(w[f"w{name}"].T)
                layer.bias.data = t(w[f"b{name}"])

        def forward(self, x):
            h = torch.relu(self.l2(torch.relu(self.l1(x))))
            return self.heads(h)

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            w = weights
            self.c1 = nn.Conv2d(3, w["c1"].shape[-1], 3, padding=1)
            self.c2 = nn.Conv2d(w["c1"].shape[-1], w["c2"].shape[-1], 3, stride=2, padding=1)
            self.l1 = nn.Linear(*w["w1"].shape)
            self.heads = nn.Linear(*w["wh"].shape)
            self.c1.weight.data = t(w["c1"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
            self.c1.bias.data = t(w["cb1"])
            self.c2.weight.data = t(w["c2"].transpose(3, 2, 0, 1))
            self.c2.bias.data = t(w["cb2"])
            for layer, name in [(self.l1, "1"), (self.heads, "h")]:
                layer.weight.data = t(w[f"w{name}"].T)
                layer.bias.data = t(w[f"b{name}"])

        def forward(self, x):
            h = torch.relu(self.c1(x))
            h = torch.relu(self.c2(h))
            h = torch.relu(self.l1(h.mean(dim=(2, 3))))
            return self.heads(h)

    return (MLP() if model == "mlp" else CNN()).to(device)


# ---------------------------------------------------------------------------
# Steps.


def jax_steps(model: str, method: str, k: int) -> dict[str, Any]:
    """The jitted ``ours`` and ``K-grad`` steps and their optimizer."""
    losses_fn = jax_task_losses(model)
    tx = optax.chain(JAX_METHODS[method](k), optax.adam(LEARNING_RATE))

    def finish(params, opt_state, grads, losses):
        updates, opt_state = tx.update(grads, opt_state, params, value=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    def ours(params, opt_state, x, y):
        losses, grads = mtl_optax.task_grads(losses_fn, params, x, y)
        return finish(params, opt_state, grads, losses)

    def k_grad(params, opt_state, x, y):
        losses = losses_fn(params, x, y)
        per_task = [
            jax.grad(lambda p, task=task: losses_fn(p, x, y)[task])(params) for task in range(k)
        ]
        grads = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
        return finish(params, opt_state, grads, losses)

    return {
        "tx": tx,
        "ours": jax.jit(ours, donate_argnums=(0, 1)),
        "k_grad": jax.jit(k_grad, donate_argnums=(0, 1)),
    }


def jax_mean_step(model: str):
    losses_fn = jax_task_losses(model)
    tx = optax.adam(LEARNING_RATE)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(losses_fn(p, x, y)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1))


def torch_step(net, aggregator, x, y, device: str) -> Callable[[], Any]:
    """The usual PyTorch step: K backward passes, the aggregator on J, Adam.

    With ``aggregator=None``: the mean-loss step (one ``backward``).
    """
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)
    k = y.shape[1]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = ((net(x) - y) ** 2).mean(dim=0)
        if aggregator is None:
            losses.mean().backward()
        else:
            rows = []
            for task in range(k):
                grads = torch.autograd.grad(losses[task], params, retain_graph=task < k - 1)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            update = aggregator(torch.stack(rows))
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = update[offset : offset + n].view_as(p)
                offset += n
        opt.step()
        sync()
        return losses

    return step


# ---------------------------------------------------------------------------
# Measurement.


def _median_ms(call: Callable[[], Any], repeats: int, budget_s: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return 1e3 * statistics.median(times)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _rss_peak(result: dict[str, float]) -> Iterator[None]:
    """Sets ``result["mb"]``: peak RSS above the RSS at entry, sampled every 0.5 ms."""
    base = _rss_bytes()
    if base is None:  # no /proc: ru_maxrss (KiB on Linux), only new process-wide peaks
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["mb"] = (after - before) / 1024
        return
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = _rss_bytes() or 0
            peak[0] = max(peak[0], rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result["mb"] = (peak[0] - base) / 2**20


def jax_peak_mb(call: Callable[[], Any], calls: int = 3) -> float:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:  # accelerator allocator
        before = stats["bytes_in_use"]
        for _ in range(calls):
            jax.block_until_ready(call())
        return (jax.devices()[0].memory_stats()["peak_bytes_in_use"] - before) / 2**20
    result: dict[str, float] = {}
    with _rss_peak(result):
        for _ in range(calls):
            jax.block_until_ready(call())
    return result["mb"]


def torch_peak_mb(call: Callable[[], Any], device: str, calls: int = 3) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(calls):
            call()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    result: dict[str, float] = {}
    with _rss_peak(result):
        for _ in range(calls):
            call()
    return result["mb"]


def xla_temp_mb(step, *args) -> float | None:
    try:
        analysis = step.lower(*args).compile().memory_analysis()
        return analysis.temp_size_in_bytes / 2**20 if analysis is not None else None
    except Exception:  # not every backend reports it
        return None


def fresh_state(tx, params):
    """``tx.init(params)`` with every array copied.

    The steps donate the optimizer state; ``init`` of mtl_optax's random methods
    returns the key array held by the transformation itself, which donation
    would delete for every later ``init``.
    """
    return jax.tree.map(jnp.copy, tx.init(params))


class _Loop:
    """Calls a donating jitted step, feeding its outputs back as its inputs."""

    def __init__(self, step, params, opt_state, x, y):
        self.step, self.state, self.x, self.y = step, (params, opt_state), x, y

    def __call__(self):
        params, opt_state, losses = self.step(*self.state, self.x, self.y)
        self.state = (params, opt_state)
        return losses


def run(args) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    use_torch = not args.no_torch
    device = "cpu"
    if use_torch:
        import torch

        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            device = "cuda"
    for model in args.models:
        sizes = model_sizes(model, args.quick)
        for k in args.K:
            weights = init_weights(model, k, sizes)
            x_np, y_np = make_batch(model, k, sizes)
            x, y = jnp.asarray(x_np), jnp.asarray(y_np)
            n_params = sum(w.size for w in weights.values())
            fresh = lambda weights=weights: jax.tree.map(jnp.asarray, weights)

            mean_tx, mean_step = jax_mean_step(model)
            p0 = fresh()
            mean_ms = _median_ms(
                _Loop(mean_step, p0, fresh_state(mean_tx, p0), x, y), args.repeats, args.budget
            )
            common = {"model": model, "K": k, "P": int(n_params), "batch": sizes["batch"]}
            common["mean_step_ms"] = mean_ms
            if use_torch:
                import torch

                x_t = torch.from_numpy(
                    x_np if model == "mlp" else np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))
                ).to(device)
                y_t = torch.from_numpy(y_np).to(device)
                net = torch_model(model, weights, device)
                with torch.no_grad():
                    torch_losses = ((net(x_t) - y_t) ** 2).mean(dim=0).cpu().numpy()
                jax_losses = np.asarray(jax_task_losses(model)(fresh(), x, y))
                common["same_model_max_abs_loss_diff"] = float(
                    np.max(np.abs(torch_losses - jax_losses))
                )
                common["torch_mean_step_ms"] = _median_ms(
                    torch_step(net, None, x_t, y_t, device), args.repeats, args.budget
                )
            for method in args.methods:
                row = dict(common, method=method)
                steps = jax_steps(model, method, k)
                tx = steps["tx"]
                p0 = fresh()
                row["jax_temp_mb"] = xla_temp_mb(steps["ours"], p0, fresh_state(tx, p0), x, y)
                p0 = fresh()
                ours = _Loop(steps["ours"], p0, fresh_state(tx, p0), x, y)
                row["ours_ms"] = _median_ms(ours, args.repeats, args.budget)
                p0 = fresh()
                row["k_grad_ms"] = _median_ms(
                    _Loop(steps["k_grad"], p0, fresh_state(tx, p0), x, y), args.repeats, args.budget
                )
                row["jax_peak_mb"] = jax_peak_mb(ours)
                if use_torch:
                    aggregator = torch_aggregator(method)
                    if aggregator is None:
                        row["torch_error"] = "no torchjd aggregator"
                    else:
                        net = torch_model(model, weights, device)
                        step = torch_step(net, aggregator, x_t, y_t, device)
                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                row["torch_ms"] = _median_ms(step, args.repeats, args.budget)
                                row["torch_peak_mb"] = torch_peak_mb(step, device)
                        except Exception as err:  # a reference failing is reported, not fatal
                            row["torch_error"] = f"{type(err).__name__}: {err}"[:160]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


# ---------------------------------------------------------------------------
# Output.

HEADER = (
    "| model | K | P | method | ours ms | mean step ms | K-grad ms | torch ms | torch mean ms"
    " | ours/mean | ours/K-grad (≤1.25) | torch/ours (>1) | jax temp MB | jax peak MB"
    " | torch peak MB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _num(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_row(row: dict[str, Any]) -> str:
    ours = row["ours_ms"]
    vs_k = ours / row["k_grad_ms"]
    torch_ms = row.get("torch_ms")
    vs_torch = torch_ms / ours if torch_ms is not None else None
    flag_k = "✓" if vs_k <= 1.25 else "✗"
    flag_t = "" if vs_torch is None else ("✓" if vs_torch > 1 else "✗")
    return (
        f"| {row['model']} | {row['K']} | {row['P']} | {row['method']} | {ours:.2f}"
        f" | {row['mean_step_ms']:.2f} | {row['k_grad_ms']:.2f} | {_num(torch_ms)}"
        f" | {_num(row.get('torch_mean_step_ms'))} | {ours / row['mean_step_ms']:.2f}"
        f" | {vs_k:.2f} {flag_k} | {_num(vs_torch)} {flag_t}"
        f" | {_num(row.get('jax_temp_mb'), '.1f')} | {_num(row.get('jax_peak_mb'), '.1f')}"
        f" | {_num(row.get('torch_peak_mb'), '.1f')} |"
    )


def summary(rows: list[dict[str, Any]]) -> str:
    within = sum(r["ours_ms"] <= 1.25 * r["k_grad_ms"] for r in rows)
    timed = [r for r in rows if r.get("torch_ms") is not None]
    faster = sum(r["ours_ms"] < r["torch_ms"] for r in timed)
    errors = [
        f"{r['model']}/K={r['K']}/{r['method']}: {r['torch_error']}"
        for r in rows
        if "torch_error" in r
    ]
    lines = [
        f"targets (printed, not asserted): ours within 1.25x of K-grad in {within}/{len(rows)} rows;"
        f" ours faster than the PyTorch step in {faster}/{len(timed)} rows.",
    ]
    diffs = [r["same_model_max_abs_loss_diff"] for r in rows if "same_model_max_abs_loss_diff" in r]
    if diffs:
        lines.append(
            f"same model check: max |loss_jax - loss_torch| at the initial weights = {max(diffs):.2e}"
        )
    lines += [f"torch reference not timed: {e}" for e in errors]
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """Limits the CPU threads of torch and of XLA (before JAX's backend starts)."""
    if threads <= 0:
        return
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def environment() -> dict[str, Any]:
    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "optax": optax.__version__,
    }
    for package in ("torch", "torchjd"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in info:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return info


MEMORY_NOTE = (
    "memory: jax temp MB = XLA memory_analysis().temp_size_in_bytes of the compiled step;"
    " peak MB = on CPU, sampled process RSS high-water mark above the RSS before 3 steps"
    " (same measure for jax and torch); on GPU, the allocator's peak above the bytes in use before."
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--K", default=None, help="comma list of task counts (default 2,4,8,16)")
    parser.add_argument("--models", default="mlp,cnn", help="comma list: mlp, cnn")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {sorted(JAX_METHODS)}"
    )
    parser.add_argument("--quick", action="store_true", help="K in {2,4}, small models, 5 repeats")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch steps")
    parser.add_argument("--repeats", type=int, default=None, help="steps timed (default 20)")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds per measurement at most (default 2)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: each library's default). 1: torch.set_num_threads(1) and"
        " single-threaded XLA CPU, for a shared machine; N > 1 sets torch's threads only",
    )
    parser.add_argument("--json", default="", help="write the environment and rows to this file")
    args = parser.parse_args()
    quick = {"K": "2,4", "repeats": 5, "budget": 0.5}
    full = {"K": "2,4,8,16", "repeats": 20, "budget": 2.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:  # explicit options win over --quick
            setattr(args, name, value)
    args.K = [int(k) for k in args.K.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in JAX_METHODS] + [
        m for m in args.models if m not in ("mlp", "cnn")
    ]
    if unknown:
        parser.error(f"unknown methods or models: {unknown}")
    set_threads(args.threads)
    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()) + "; float32, median ms per step")
    print(MEMORY_NOTE)
    print(HEADER)
    rows = run(args)
    print(summary(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "memory": MEMORY_NOTE, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
