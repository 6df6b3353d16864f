"""Timing and verification: CUDA events or ``perf_counter``, buffer sets rotated past the L2
cache, and every implementation checked against the float64 reference before it is timed."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuadam.bench.cases import Case, Implementation
from gpuadam.bench.config import Config
from gpuadam.bench.peers import import_torch
from gpuadam.bench.problems import GPU, HALF_FORMATS, L2_DEFAULT_BYTES, VERIFY_STEPS, Problem, is_half, ulp
from gpuadam.bench.progress import Progress


@dataclass
class Entry:
    """One implementation on one problem, and everything measured about it."""

    suite: str  # "sizes" | "many" | "overhead"
    impl: Implementation
    problem: Problem
    layout: str = "one tensor"
    host_timer: bool = False  # overhead: host wall-clock even on a GPU
    status: str = "pending"  # -> "ok" | "failed" | "error" | "unavailable"
    reason: str | None = None
    verified: bool = False
    verify_error: float | None = None
    timer: str | None = None
    event_timing: bool | None = None
    sets: int = 1
    steps_per_sample: int = 0
    samples: list[float] = field(default_factory=list)  # seconds per step
    round_medians: list[float] = field(default_factory=list)  # each round's median (see run_entries)
    first_in_round: list[int] = field(default_factory=list)  # the rounds in which it allocated first
    case: Case | None = None
    _next_set: int = 0

    def median(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None


def _events(lib: str) -> tuple[Callable[[], Any], Callable[[Any, Any], float]]:
    """(new event, elapsed ms between two) for one library's CUDA events."""
    if lib == "numba":
        from numba import cuda

        return cuda.event, lambda a, b: a.elapsed_time(b)
    if lib == "cupy":
        import cupy

        return cupy.cuda.Event, cupy.cuda.get_elapsed_time
    if lib == "torch":
        torch = import_torch()
        return functools.partial(torch.cuda.Event, enable_timing=True), lambda a, b: a.elapsed_time(b)
    raise ValueError(f"no CUDA events for {lib!r}")


def _sample(entry: Entry, k: int) -> float:
    """Seconds per step over ``k`` back-to-back steps (rotating the buffer sets on a GPU)."""
    case = entry.case
    use_events = case.events is not None and not entry.host_timer
    if use_events:
        new_event, elapsed_ms = _events(case.events)
        start, end = new_event(), new_event()
        start.record()
    t0 = time.perf_counter()
    for _ in range(k):
        case.step(entry._next_set)
        entry._next_set = (entry._next_set + 1) % case.sets
    if use_events:
        end.record()
        end.synchronize()
        wall = time.perf_counter() - t0
        ms = elapsed_ms(start, end)
        # Numba's simulator records no times (elapsed is -1): the wall clock is all there is.
        entry.event_timing = ms > 0
        return (ms / 1e3 if ms > 0 else wall) / k
    case.sync()
    return (time.perf_counter() - t0) / k


def verify(entry: Entry) -> tuple[float, str]:
    """Run VERIFY_STEPS steps on set 0, each compared with the float64 reference's step from the
    implementation's own values before it: the worst error as a fraction of its budget, and where.

    Per array, the budget is ``tolerance_eps`` eps of the compute dtype of ``max|x| + max|change|``
    (the math), plus, for half storage, ``storage_ulps`` units in the last place of the stored
    format at each element (the rounding: a max-norm budget would be blind there, an update is
    smaller than the params' ulp). Stepping from its own values keeps one step's rounding from
    compounding into the next step's budget. An implementation may allow more per element
    (``Implementation.expected_with_allowance``): lean state's quantisation (``bench.lean_state``).
    """
    case, problem, impl = entry.case, entry.problem, entry.impl
    idx = problem.sample
    before = impl.initial(problem, idx)
    worst, where = 0.0, ""
    for t, g in enumerate((problem.g1, problem.g2)[:VERIFY_STEPS], start=1):
        if t > 1:
            case.set_grad(g)
        case.step(0)
        case.sync()
        got = case.state()
        want, allowance = impl.expected_with_allowance(problem, before, g[idx], t)
        have = {}
        for name, target in want.items():
            if name not in got:
                raise KeyError(f"the implementation does not expose its {name!r}")
            x = have[name] = np.asarray(got[name]).reshape(-1)[idx].astype(np.float64)
            err = _step_error(impl, problem, name, x, target, before[name], allowance.get(name))
            if err > worst:
                bad = ~np.isfinite(x) & np.isfinite(target)
                worst = err
                where = (f"{name} at step {t} holds inf/NaN where the reference is finite" if bad.any() else
                         f"{name} at step {t}: error {err:.3g}x its budget")
        before = {**before, **have}
    return worst, where


def _step_error(impl: Implementation, problem: Problem, name: str, have: np.ndarray, want: np.ndarray,
                start: np.ndarray, allowance: np.ndarray | None = None) -> float:
    """max |have - want| over its budget (see ``verify``), ``allowance`` added to it per element."""
    storage = problem.storage(name)
    half_math = impl.half_arithmetic and is_half(storage)
    eps = 2.0 ** -HALF_FORMATS[storage.name][0] if half_math else float(np.finfo(problem.compute_dtype).eps)
    budget = impl.tolerance_eps * eps * (np.abs(want).max() + np.abs(want - start).max())
    if impl.storage_ulps and is_half(storage) and not half_math:
        budget = budget + impl.storage_ulps * ulp(want, storage)
    if allowance is not None:
        budget = budget + allowance
    err = (np.abs(have - want) / np.maximum(budget, np.finfo(np.float64).tiny)).max()
    return float(err) if np.isfinite(err) else math.inf


def _buffer_sets(entry: Entry, config: Config, l2_bytes: int) -> int:
    """GPU: enough buffer sets that their sum exceeds twice the L2 cache (capped); CPU: one."""
    if entry.impl.device != GPU or entry.host_timer:
        return 1
    problem = entry.problem
    footprint = problem.spec.read_bytes(problem.dtype, problem.master) * problem.n
    if footprint >= l2_bytes:
        return 1
    return int(min(config.max_sets, math.ceil(2 * l2_bytes / footprint)))


def _gpu_l2_bytes() -> int:
    for probe in (
        lambda: __import__("numba.cuda", fromlist=["cuda"]).get_current_device().L2_CACHE_SIZE,
        lambda: __import__("cupy").cuda.Device().attributes["L2CacheSize"],
    ):
        try:
            value = int(probe())
            if value > 0:
                return value
        except Exception:  # no device, the simulator, or no such attribute: try the next
            pass
    return L2_DEFAULT_BYTES


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _set_up(e: Entry, config: Config, l2: int, progress: Progress, first: bool) -> bool:
    """Allocate, verify and warm up ``e``'s case; False (with the status set) when it cannot be timed.
    The first round also sizes a sample, so every round's samples are alike."""
    work = 1 + config.repeat
    if first:
        reason = e.impl.unavailable(e.problem)
        if reason is not None:
            e.status, e.reason = "unavailable", reason
            progress.advance(work * config.rounds)
            return False
    progress.note(f"checking {e.impl.name} {e.problem.label}")
    try:
        e.sets = _buffer_sets(e, config, l2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. JAX on donation, torch on fused defaults
            e.case = e.impl.setup(e.problem, e.sets)
            error, where = verify(e)
    except Exception as exc:
        e.status, e.reason, e.case = "error", _reason(exc), None
        progress.advance(work * (config.rounds if first else 1))
        return False
    e.verify_error = error if e.verify_error is None else max(e.verify_error, error)
    if not error <= 1.0:
        e.status, e.case = "failed", None
        e.reason = f"disagrees with the float64 reference: {where}"
        progress.advance(work * (config.rounds if first else 1))
        return False
    e.verified = True
    e.timer = "cuda-events" if e.case.events and not e.host_timer else "perf_counter"
    # Warm up every buffer set, then size a sample so the timer's resolution does not matter.
    for k in range(e.case.sets):
        e.case.step(k)
    e.case.sync()
    if first:
        one = _sample(e, 1)
        e.steps_per_sample = int(min(config.max_steps, max(1, math.ceil(config.min_time / max(one, 1e-9)))))
    progress.advance(1)
    return True


def run_entries(entries: list[Entry], config: Config, progress: Progress) -> None:
    """Set up, verify, then time ``entries`` (interleaved round-robin), in ``config.rounds`` rounds;
    fills each entry in place.

    Which implementation allocates first changes the memory each one gets, and with it the time of
    a memory-bound step by several percent, so each round allocates fresh buffers in a rotated order
    (a different implementation first) and drops them before the next. ``round_medians`` keep each
    round's median: their spread is part of the figure, not noise to hide.
    """
    l2 = _gpu_l2_bytes() if any(e.impl.device == GPU for e in entries) else L2_DEFAULT_BYTES
    for j in range(config.rounds):
        shift = (j * len(entries)) // config.rounds
        order = [e for e in entries[shift:] + entries[:shift] if e.status == "pending"]
        live = [e for e in order if _set_up(e, config, l2, progress, first=j == 0)]
        if live:
            live[0].first_in_round.append(j)
        start = {id(e): len(e.samples) for e in live}
        for r in range(config.repeat):
            turn = r % max(1, len(live))  # rotate the order so no implementation always runs first
            for e in live[turn:] + live[:turn]:
                progress.note(f"timing {e.impl.name} {e.problem.label} (round {j + 1}/{config.rounds}, "
                              f"{r + 1}/{config.repeat})")
                e.samples.append(_sample(e, e.steps_per_sample))
                progress.advance(1)
        for e in live:
            e.round_medians.append(float(np.median(e.samples[start[id(e)]:])))
            e.case = None  # freed before the next round allocates
    for e in entries:
        if e.status == "pending" and e.samples:
            e.status = "ok"
