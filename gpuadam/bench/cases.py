"""The interface every implementation follows (``Implementation`` builds a ``Case``), and the
buffers of ours in a backend's memory."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.bench.problems import (
    CPU,
    GPU,
    VERIFY_STORAGE_ULPS,
    VERIFY_ULPS,
    Problem,
    is_half,
)
from gpuadam.kernels.lean_maps import MIN_SIZE
from gpuadam.reference import adam_reference

# An Implementation says whether it can run a problem and builds a Case: its own copy of the
# problem's arrays (``sets`` copies on a GPU, rotated so the L2 cache cannot serve them), which it
# steps, reads back, and synchronises.


class Case:
    """One implementation's buffers for one problem."""

    sets: int = 1
    events: str | None = None  # which library's CUDA events time it; None: perf_counter

    def step(self, k: int) -> None:
        """One optimizer step on buffer set ``k``."""
        raise NotImplementedError

    def set_grad(self, g: np.ndarray) -> None:
        """Copy the concatenated host gradient ``g`` into buffer set 0."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Host copies (or views) of set 0's p, m, v (and vmax), concatenated over the tensors."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for the work already queued (GPU, JAX)."""


class Implementation:
    """One way of running a step; subclasses set the attributes and implement ``setup``."""

    name = ""
    group = "peer"  # "ceiling" | "ours" | "peer"
    device = CPU
    backend = ""
    launches = "per tensor"  # how many launches a step makes, for the many-tensor table
    tolerance_eps = VERIFY_ULPS  # verification tolerance (see ``verify``)
    note = ""  # shown under the table: anything a reader must know to trust the row

    #: The state's layout when it is not the params' own (``problems.LEAN_STATE``): its bytes, its
    #: ceiling and its verification differ.
    state_dtype: str | None = None
    storage_ulps = VERIFY_STORAGE_ULPS  # half storage: the rounding allowed per element (see ``verify``)
    #: Half storage computed op by op in the half format (no float32 math): its math budget is then
    #: in eps of that format, and no per-element ulps (rounding each operation cancels to many).
    half_arithmetic = False

    def note_for(self, problem: Problem) -> str:
        """What a reader must know to trust this row (shown under the table)."""
        if problem.half and self.half_arithmetic:
            return (f"computes op by op in {problem.dtype} (no float32 math): checked at {self.tolerance_eps} "
                    f"{problem.dtype} eps of each array's scale, not per-element ulps")
        return self.note

    def unavailable(self, problem: Problem) -> str | None:
        """Why this cannot run ``problem`` here, or None when it can."""
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        raise NotImplementedError

    def initial(self, problem: Problem, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Every array's start at ``idx``, in float64: p0, zero state, the master a copy of p0."""
        p0 = problem.p0[idx].astype(np.float64)
        out = {"p": p0, **{name: np.zeros_like(p0) for name in problem.spec.state}}
        if problem.master:
            out["w"] = p0
        return out

    def bytes_per_step(self, problem: Problem) -> int:
        """The bytes one step of this implementation's state layout must move (bandwidth = this / time)."""
        return problem.bytes_per_step

    def expected_with_allowance(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                                t: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``expected_step``, and per array an error allowed at each element beyond the math's budget
        (a quantised state's rounding: ``timing.verify``); none by default."""
        return self.expected_step(problem, before, g, t), {}

    def expected_step(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                      t: int) -> dict[str, np.ndarray]:
        """Step ``t`` of the float64 reference from ``before`` (this implementation's own values after
        the step before) with gradient ``g``, unrounded; with master weights ``p`` is the new master."""
        p = before["w" if problem.master else "p"]
        state = {"exp_avg": before["m"], "exp_avg_sq": before["v"]}
        if "vmax" in before:
            state["max_exp_avg_sq"] = before["vmax"]
        p, state = adam_reference(p, g, state, problem.spec.hyper, t)
        out = {"p": p, "m": state["exp_avg"], "v": state["exp_avg_sq"]}
        if "vmax" in problem.spec.state:
            out["vmax"] = state["max_exp_avg_sq"]
        if problem.master:
            out["w"] = p
        return out


@functools.cache
def lean_refusal(backend: str, kind: str) -> str | None:
    """Why ``gpuadam.Adam(state_dtype=kind)`` refuses ``backend`` here (its own words), or None: the
    optimizer is asked, on a float32 probe large enough for lean state, so a backend that gains
    the lean kernels is benchmarked without a change here."""
    import gpuadam

    be = backends.get(backend)
    try:
        gpuadam.Adam([be.zeros(MIN_SIZE, np.float32)], backend=backend, state_dtype=kind)
    except ValueError as exc:
        return " ".join(str(exc).split())
    return None


def lean_unavailable(problem: Problem, kind: str) -> str | None:
    """Why the bench's ``kind``-state rows cannot run ``problem``: float32 params, Adam/AdamW, one
    tensor of at least ``MIN_SIZE`` elements for int8 (a smaller one keeps float32 state)."""
    if problem.dtype != np.float32 or problem.master:
        return f"{kind} state is benchmarked with float32 params (--dtype float32)"
    if problem.spec.rule != "adam":
        return f"{kind} state is for Adam/AdamW without amsgrad"
    if len(problem.sizes) != 1:
        return f"{kind} state runs in the size sweep (one tensor)"
    if kind == "int8" and problem.n < MIN_SIZE:
        return f"tensors under {MIN_SIZE} elements keep float32 state"
    return None


def device_of(backend: str) -> str:
    return CPU if backend == "numba-cpu" else GPU


def to_backend(be: Any, host: np.ndarray) -> Any:
    """A copy of ``host`` in ``be``'s memory, through the backend's own allocation and copy."""
    out = be.zeros_like(host)
    be.copy_from_host(out, host)
    return out


def _sync_backend(backend: str) -> None:
    if backend == "numba-cuda":
        from numba import cuda

        cuda.synchronize()
    elif backend == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


def _events_for(backend: str) -> str | None:
    return {"numba-cuda": "numba", "cupy": "cupy"}.get(backend)


def half_format_code(dtype: np.dtype) -> int:
    from gpuadam.kernels.lowp import BFLOAT16, FLOAT16

    return BFLOAT16 if dtype.name == "bfloat16" else FLOAT16


class BackendCase(Case):
    """Arrays of ours in one backend's memory: ``sets`` of (params, grads), per tensor.

    bfloat16 has no ``__cuda_array_interface__`` type: on a GPU its arrays are uint16 storage,
    declared to the optimizer with ``half_format="bfloat16"``.
    """

    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        self.backend = backend
        self.be = backends.get(backend)
        self.problem = problem
        self.sets = sets
        self.events = _events_for(backend)
        self.bits16 = problem.dtype.name == "bfloat16" and device_of(backend) == GPU
        self.half_format = "bfloat16" if self.bits16 else None
        self.params = [[self.upload(x) for x in problem.split(problem.p0)] for _ in range(sets)]
        self.grads = [[self.upload(x) for x in problem.split(problem.g1)] for _ in range(sets)]

    def upload(self, host: np.ndarray) -> Any:
        if device_of(self.backend) == CPU:
            # A training loop's params and grads are the user's arrays, allocated by NumPy (16 bytes
            # past a cache line when large), not ours, which start on a line: time what it sees.
            return np.array(host, copy=True)
        return to_backend(self.be, self.storable(host))

    def storable(self, host: np.ndarray) -> np.ndarray:
        return host.view(np.uint16) if self.bits16 and host.dtype == self.problem.dtype else host

    def kernel_view(self, x: Any) -> Any:
        """The 1-D view a kernel takes: half arrays as their 16-bit patterns."""
        flat = self.be.flat(x)
        return flat.view(np.uint16) if is_half(flat.dtype) or flat.dtype == np.uint16 else flat

    def set_grad(self, g: np.ndarray) -> None:
        for dst, src in zip(self.grads[0], self.problem.split(g)):
            self.be.copy_from_host(dst, self.storable(src))

    def _host(self, arrays: Sequence[Any], dtype: Any = None) -> np.ndarray:
        out = np.concatenate([self.be.to_host(a).reshape(-1) for a in arrays])
        return out if dtype is None else out.view(dtype)

    def sync(self) -> None:
        _sync_backend(self.backend)
