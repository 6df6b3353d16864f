"""Micro-benchmark engine behind ``gpuadam bench``: the ceiling, our kernels, the peers.

Reading order:

(a) ceiling kernels  - move exactly the bytes of one optimizer step with no math: the bandwidth a
                       step can reach on this backend, measured in the same run
(b) implementations  - ours per backend (the public ``Adam.step``, ``adam_step`` and the raw kernel
                       launch, so host overhead shows separately) and the peers, each only if importable
(c) timing           - CPU: ``perf_counter``, implementations interleaved round-robin; GPU: CUDA
                       events around the launches, buffer sets rotated past the L2 cache
(d) verification     - two steps of every implementation against ``gpuadam.reference`` before it is
                       timed; one that fails is reported and never timed
(e) reporting        - table, JSON, PNG

Byte accounting: a step must read every array it uses once and write every array it changes once;
for Adam that is p, g, m, v read and p, m, v written, ``7 * itemsize`` = 28 B/element in float32
(AMSGrad adds vmax: 9 arrays, 36 B). Bandwidth is those bytes divided by the time. The ceiling
kernel reads and writes the same arrays, so it is counted the same way (write-allocate traffic, the
read of a line before it is written, is neither counted for it nor for us).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange

from gpuadam import backends
from gpuadam.hyper import AdamHyper
from gpuadam.kernels.numba_cpu import PARALLEL_MIN
from gpuadam.reference import adam_reference

SCHEMA = "gpuadam-bench/1"
CPU, GPU = "cpu", "gpu"
DEFAULT_SIZES = (2**16, 2**20, 2**24)
QUICK_SIZES = (2**12, 2**16)
#: Stored in 16 bits, computed in float32: with half state, or (``--master-weights``) float32 master
#: weights and state beside the half params.
LOW_PRECISION = ("float16", "bfloat16")
DTYPES = ("float32", "float64", *LOW_PRECISION)

L2_DEFAULT_BYTES = 50 * 2**20  # H100's L2, when the device does not say
VERIFY_STEPS = 2  # step 1 from zero state hides beta2 and the bias corrections: p1 = p0 - lr*sign(g)
VERIFY_SAMPLE = 1 << 16  # elements compared with the float64 reference (the rule is elementwise)
VERIFY_ULPS = 4  # allowed error, in eps of the compute dtype, per step, of max|x| + max|change of x|
#: Half storage: and, per element, this many units in the last place of the stored format (ours round
#: once per step, to nearest even).
VERIFY_STORAGE_ULPS = 1
TINY = 64  # elements of the tensor that measures per-step host overhead
MANY_COUNT = 400
MANY_RANGE = (1_000, 100_000)
#: Elements per block of the NumPy peer: its two scratch blocks and the array blocks stay in cache,
#: so the dozen ufunc passes per element hit cache instead of memory (on a 32 MB-L3 EPYC, 2^16 to
#: 2^18 were best; unblocked was 1.9x slower at 2^24 elements).
NUMPY_BLOCK = 1 << 18

STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax", "master": "w"}


# =============================================================================================
# Byte accounting and the problems


def is_half(dtype: Any) -> bool:
    """float16 or bfloat16 (``ml_dtypes``): stored in 16 bits, computed in float32."""
    return np.dtype(dtype).name in LOW_PRECISION


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a ``--dtype`` name (bfloat16 is ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as benchmarked: its kernel rule, hyperparameters, and the arrays it moves.

    Array names: ``p`` the params, ``g`` the gradients, ``m``, ``v``, ``vmax`` the state, and with
    master weights ``w``, the float32 master the step updates (``p`` is then only written).
    """

    name: str
    rule: str
    hyper: AdamHyper
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def state(self) -> tuple[str, ...]:
        """The state arrays (everything written except p), as ``m``, ``v``, ``vmax``."""
        return tuple(x for x in self.writes if x != "p")

    def io(self, master: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(reads, writes)``: with master weights the step reads and writes ``w`` and only writes ``p``."""
        if not master:
            return self.reads, self.writes
        swap = tuple("w" if x == "p" else x for x in self.reads)
        return swap, (*(x for x in self.writes if x != "p"), "w", "p")

    def itemsize(self, name: str, dtype: Any, master: bool = False) -> int:
        """Bytes per element of array ``name``: params and gradients in ``dtype``, master and state in
        float32 with master weights, else in ``dtype`` too."""
        dtype = np.dtype(dtype)
        return dtype.itemsize if name in ("p", "g") or not master else 4

    def bytes_per_element(self, dtype: Any, master: bool = False) -> int:
        """Bytes one step must move per element: each array read once, each changed one written once."""
        reads, writes = self.io(master)
        return sum(self.itemsize(x, dtype, master) for x in reads + writes)

    def read_bytes(self, dtype: Any, master: bool = False) -> int:
        return sum(self.itemsize(x, dtype, master) for x in self.io(master)[0])

    def accounting(self, dtype: Any, master: bool = False) -> dict:
        reads, writes = self.io(master)

        def listed(names: tuple[str, ...]) -> str:
            return ", ".join(f"{x} {self.itemsize(x, dtype, master)}" for x in names)

        read_b = sum(self.itemsize(x, dtype, master) for x in reads)
        total = self.bytes_per_element(dtype, master)
        return {
            "bytes_per_element": total,
            "reads": list(reads),
            "writes": list(writes),
            "definition": (
                f"reads {listed(reads)} ({read_b} B) and writes {listed(writes)} ({total - read_b} B) once "
                f"per element = {total} B/element; the ceiling moves the same arrays"
            ),
        }


_ADAM_IO = (("p", "g", "m", "v"), ("p", "m", "v"))
_AMSGRAD_IO = (("p", "g", "m", "v", "vmax"), ("p", "m", "v", "vmax"))

OPTIMIZERS = {
    "adam": OptimizerSpec("adam", "adam", AdamHyper(), *_ADAM_IO),
    "adamw": OptimizerSpec("adamw", "adam", AdamHyper(weight_decay=1e-2, decoupled_weight_decay=True), *_ADAM_IO),
    "amsgrad": OptimizerSpec("amsgrad", "amsgrad", AdamHyper(amsgrad=True), *_AMSGRAD_IO),
}


@dataclass
class Problem:
    """Host data of one benchmark point: the tensors' sizes, random p0 and two gradients (in the
    params' dtype), and whether the step keeps float32 master weights."""

    spec: OptimizerSpec
    dtype: np.dtype
    sizes: tuple[int, ...]
    p0: np.ndarray  # all tensors concatenated
    g1: np.ndarray
    g2: np.ndarray
    sample: np.ndarray  # indices the verification compares
    master: bool = False

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    @property
    def bytes_per_step(self) -> int:
        return self.spec.bytes_per_element(self.dtype, self.master) * self.n

    @property
    def half(self) -> bool:
        return is_half(self.dtype)

    @property
    def compute_dtype(self) -> np.dtype:
        """The precision of the math: float32 for half storage."""
        return np.dtype(np.float32) if self.half else self.dtype

    def storage(self, name: str) -> np.dtype:
        """The dtype array ``name`` is stored in (``spec.itemsize``'s rule)."""
        return self.dtype if name in ("p", "g") or not self.master else np.dtype(np.float32)

    @property
    def label(self) -> str:
        return size_label(self.n) if len(self.sizes) == 1 else f"{len(self.sizes)} tensors, {self.n} el."

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """Per-tensor views of a concatenated host array."""
        bounds = np.cumsum((0,) + self.sizes)
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def make_problem(spec: OptimizerSpec, dtype: Any, sizes: Sequence[int], seed: int, master: bool = False) -> Problem:
    """Random parameters and gradients (never zeros: they would flatter a kernel on some hardware)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(sum(sizes))
    draw = np.float32 if is_half(dtype) else dtype  # half values: float32 draws, rounded to nearest
    p0, g1, g2 = (rng.standard_normal(n, dtype=draw).astype(dtype) for _ in range(3))
    if n <= VERIFY_SAMPLE:
        sample = np.arange(n)
    else:  # both ends (tails and remainders live there), and a random spread in between
        ends = np.r_[0:1024, n - 1024 : n]
        sample = np.unique(np.r_[ends, rng.integers(0, n, VERIFY_SAMPLE - ends.size)])
    return Problem(spec, dtype, tuple(int(s) for s in sizes), p0, g1, g2, sample, master)


def many_sizes(count: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    """``count`` tensor sizes log-uniform in [low, high]: a model's many small tensors."""
    rng = np.random.default_rng(seed)
    return tuple(int(x) for x in np.exp(rng.uniform(math.log(low), math.log(high), count)).round())


def size_label(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"2^16,2**20,1000,1e6"`` -> sizes; a ValueError names the bad item."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "^" in item or "**" in item:
                base, exp = item.replace("**", "^").split("^")
                value = int(base) ** int(exp)
            else:
                value = float(item) if "e" in item.lower() else int(item)
                if value != int(value):
                    raise ValueError
                value = int(value)
        except ValueError:
            raise ValueError(f"--sizes: cannot read {item!r} (use e.g. 2^20, 1048576 or 1e6)") from None
        if value < 1:
            raise ValueError(f"--sizes: sizes must be >= 1, got {item!r}")
        sizes.append(value)
    return tuple(sizes)


def _adam_kwargs(h: AdamHyper) -> dict:
    return dict(
        lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad,
        maximize=h.maximize, eps_root=h.eps_root, bias_correction=h.bias_correction,
        decoupled_weight_decay=h.decoupled_weight_decay,
    )


# =============================================================================================
# (a) ceiling kernels: the same loads and stores as a step, and no math the compiler could elide
#
# Adam:    p, m, v = g, p, m + v              reads p g m v, writes p m v
# AMSGrad: p, m, v, x = g, p, m + v, x + v    reads p g m v x, writes p m v x
# Half state: the same on the 16-bit patterns (integer sums, wrapping). Master weights, float32
# w, m, v (and x) beside the half p and g, as our kernels take them: (w, g, m, v[, x], p16):
# Adam:    w, m, v, p16 = m, w, m + v, g            reads w g m v, writes w m v p16
# AMSGrad: w, m, v, x, p16 = m, w, m + v, x + v, g  reads w g m v x, writes w m v x p16


@njit(parallel=True, cache=True)
def _ceiling_adam_parallel(p, g, m, v):
    for i in prange(p.size):
        p[i], m[i], v[i] = g[i], p[i], m[i] + v[i]


@njit(cache=True)
def _ceiling_adam_serial(p, g, m, v):
    for i in range(p.size):
        p[i], m[i], v[i] = g[i], p[i], m[i] + v[i]


@njit(parallel=True, cache=True)
def _ceiling_amsgrad_parallel(p, g, m, v, w):
    for i in prange(p.size):
        p[i], m[i], v[i], w[i] = g[i], p[i], m[i] + v[i], w[i] + v[i]


@njit(cache=True)
def _ceiling_amsgrad_serial(p, g, m, v, w):
    for i in range(p.size):
        p[i], m[i], v[i], w[i] = g[i], p[i], m[i] + v[i], w[i] + v[i]


@njit(parallel=True, cache=True)
def _ceiling_adam_master_parallel(w, g, m, v, p16):
    for i in prange(w.size):
        w[i], m[i], v[i], p16[i] = m[i], w[i], m[i] + v[i], g[i]


@njit(cache=True)
def _ceiling_adam_master_serial(w, g, m, v, p16):
    for i in range(w.size):
        w[i], m[i], v[i], p16[i] = m[i], w[i], m[i] + v[i], g[i]


@njit(parallel=True, cache=True)
def _ceiling_amsgrad_master_parallel(w, g, m, v, x, p16):
    for i in prange(w.size):
        w[i], m[i], v[i], x[i], p16[i] = m[i], w[i], m[i] + v[i], x[i] + v[i], g[i]


@njit(cache=True)
def _ceiling_amsgrad_master_serial(w, g, m, v, x, p16):
    for i in range(w.size):
        w[i], m[i], v[i], x[i], p16[i] = m[i], w[i], m[i] + v[i], x[i] + v[i], g[i]


def _threaded(parallel: Callable, serial: Callable) -> Callable:
    """The threading (and threshold) of ``kernels.numba_cpu``."""

    def kernel(*arrays: np.ndarray) -> None:
        (parallel if arrays[0].size >= PARALLEL_MIN else serial)(*arrays)

    return kernel


def _cpu_ceiling() -> dict[str, Callable]:
    """Numba CPU ceiling kernels, threaded as ours are."""
    return {
        "adam": _threaded(_ceiling_adam_parallel, _ceiling_adam_serial),
        "amsgrad": _threaded(_ceiling_amsgrad_parallel, _ceiling_amsgrad_serial),
        "adam/master": _threaded(_ceiling_adam_master_parallel, _ceiling_adam_master_serial),
        "amsgrad/master": _threaded(_ceiling_amsgrad_master_parallel, _ceiling_amsgrad_master_serial),
    }


def _numba_cuda_ceiling() -> dict[str, Callable]:
    """Numba CUDA ceiling kernels (``gpuadam.bench_cuda``, imported only now: it imports numba.cuda)."""
    from gpuadam import bench_cuda

    return {rule: functools.partial(bench_cuda.launch, rule) for rule in bench_cuda.KERNELS}


#: CuPy ceiling bodies, bound like ``kernels.cupy_elementwise`` binds its arrays (raw, index i).
#: ``T`` is the arrays' dtype (uint16 for half state); the master kernels name their types.
CUPY_CEILING = {
    "adam": ("raw T raw_g", "raw T raw_p, raw T raw_m, raw T raw_v",
             "const T g = raw_g[i]; const T p = raw_p[i]; const T s = raw_m[i] + raw_v[i];\n"
             "raw_p[i] = g; raw_m[i] = p; raw_v[i] = s;"),
    "amsgrad": ("raw T raw_g", "raw T raw_p, raw T raw_m, raw T raw_v, raw T raw_w",
                "const T g = raw_g[i]; const T p = raw_p[i]; const T v = raw_v[i];\n"
                "const T s = raw_m[i] + v; const T w = raw_w[i] + v;\n"
                "raw_p[i] = g; raw_m[i] = p; raw_v[i] = s; raw_w[i] = w;"),
    "adam/master": ("raw uint16 raw_g", "raw float32 raw_w, raw float32 raw_m, raw float32 raw_v, raw uint16 raw_p16",
                    "const unsigned short g = raw_g[i]; const float w = raw_w[i]; const float m = raw_m[i];\n"
                    "const float s = m + raw_v[i];\n"
                    "raw_w[i] = m; raw_m[i] = w; raw_v[i] = s; raw_p16[i] = g;"),
    "amsgrad/master": ("raw uint16 raw_g",
                       "raw float32 raw_w, raw float32 raw_m, raw float32 raw_v, raw float32 raw_x, raw uint16 raw_p16",
                       "const unsigned short g = raw_g[i]; const float w = raw_w[i]; const float m = raw_m[i];\n"
                       "const float v = raw_v[i]; const float s = m + v; const float x = raw_x[i] + v;\n"
                       "raw_w[i] = m; raw_m[i] = w; raw_v[i] = s; raw_x[i] = x; raw_p16[i] = g;"),
}


@functools.cache
def _cupy_ceiling() -> dict[str, Callable]:
    import cupy

    kernels = {}
    for rule, (ins, outs, body) in CUPY_CEILING.items():
        name = f"gpuadam_ceiling_{rule.replace('/', '_')}"
        k = cupy.ElementwiseKernel(ins, outs, body, name=name, no_return=True)
        kernels[rule] = functools.partial(lambda k, p, g, *rest: k(g, p, *rest, size=p.size), k)
    return kernels


def ceiling_kernel(backend: str, rule: str, master: bool = False) -> Callable:
    """The ceiling kernel of ``backend`` for ``rule``: ``kernel(p, g, m, v[, vmax])`` (any dtype,
    16-bit patterns for half state), or with ``master`` ``kernel(w, g, m, v[, vmax], p16)``."""
    table = {"numba-cpu": _cpu_ceiling, "numba-cuda": _numba_cuda_ceiling, "cupy": _cupy_ceiling}
    return table[backend]()[f"{rule}/master" if master else rule]


# =============================================================================================
# (b) implementations
#
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

    def expected_step(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                      t: int) -> dict[str, np.ndarray]:
        """Step ``t`` of the float64 reference from ``before`` (this implementation's own values after
        the step before) with gradient ``g``, unrounded; with master weights ``p`` is the new master."""
        vmax = before.get("vmax")
        p = before["w" if problem.master else "p"]
        p, m, v, vmax = adam_reference(p, g.astype(np.float64), before["m"], before["v"], vmax,
                                       problem.spec.hyper, t)
        out = {"p": p, "m": m, "v": v}
        if "vmax" in problem.spec.state:
            out["vmax"] = vmax
        if problem.master:
            out["w"] = p
        return out


def _device_of(backend: str) -> str:
    return CPU if backend == "numba-cpu" else GPU


def _to_backend(be: Any, host: np.ndarray) -> Any:
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


def _half_format_code(dtype: np.dtype) -> int:
    from gpuadam.kernels.lowp import BFLOAT16, FLOAT16

    return BFLOAT16 if dtype.name == "bfloat16" else FLOAT16


class _BackendCase(Case):
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
        self.bits16 = problem.dtype.name == "bfloat16" and _device_of(backend) == GPU
        self.half_format = "bfloat16" if self.bits16 else None
        self.params = [[self.upload(x) for x in problem.split(problem.p0)] for _ in range(sets)]
        self.grads = [[self.upload(x) for x in problem.split(problem.g1)] for _ in range(sets)]

    def upload(self, host: np.ndarray) -> Any:
        return _to_backend(self.be, self.storable(host))

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


class OursOptimizer(Implementation):
    """``gpuadam.Adam`` / ``AdamW`` and ``opt.step(grads)``: validation, constants, dispatch, kernel."""

    group = "ours"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.device = _device_of(backend)
        self.name = f"gpuadam {backend} Adam.step"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OptimizerCase(self.backend, problem, sets)


def _optimizer_class(spec: OptimizerSpec) -> type:
    import gpuadam

    return gpuadam.AdamW if spec.name == "adamw" else gpuadam.Adam


class _OptimizerCase(_BackendCase):
    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        super().__init__(backend, problem, sets)
        self.opts = [self.optimizer(params) for params in self.params]

    def optimizer(self, params: list) -> Any:
        problem = self.problem
        return _optimizer_class(problem.spec)(
            params, backend=self.backend, master_weights=problem.master, half_format=self.half_format,
            **_adam_kwargs(problem.spec.hyper),
        )

    def step(self, k: int) -> None:
        self.opts[k].step(self.grads[k])

    def state(self) -> dict[str, np.ndarray]:
        opt, problem = self.opts[0], self.problem
        out = {"p": self._host(self.params[0], problem.dtype)}
        for name, short in STATE_NAMES.items():
            if name in opt.state[0]:
                out[short] = self._host([s[name] for s in opt.state], problem.storage(short))
        return out


class OursFlatBuffer(OursOptimizer):
    """``gpuadam.Adam(buffer.views)`` on a ``gpuadam.FlatBuffer``: one launch for all tensors."""

    launches = "one"

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} FlatBuffer"

    def unavailable(self, problem: Problem) -> str | None:
        import gpuadam

        if not hasattr(gpuadam, "FlatBuffer"):
            return "gpuadam.FlatBuffer is not in this version of gpuadam"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _FlatCase(self.backend, problem, sets)


class _FlatCase(_OptimizerCase):
    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        import gpuadam

        _BackendCase.__init__(self, backend, problem, 0)  # the buffers below are the arrays
        self.sets = sets
        device = "cpu" if backend == "numba-cpu" else "cuda"
        dtype = np.uint16 if self.bits16 else problem.dtype
        self.buffers = []
        for _ in range(sets):
            pbuf = gpuadam.FlatBuffer(list(problem.sizes), dtype, device)
            gbuf = pbuf.zeros_like()
            for buf, x in ((pbuf, problem.p0), (gbuf, problem.g1)):
                for view, part in zip(buf.views, problem.split(x)):
                    self.be.copy_from_host(view, self.storable(part))
            self.buffers.append((pbuf, gbuf))
            self.params.append(pbuf.views)
            self.grads.append(gbuf.views)
        self.opts = [self.optimizer(params) for params in self.params]


class OursFunctional(OursOptimizer):
    """``gpuadam.adam_step`` on caller-owned arrays: validation and constants on every call."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} adam_step"

    def unavailable(self, problem: Problem) -> str | None:
        if problem.half:
            return "adam_step takes float32/float64 arrays (half params need gpuadam.Adam's state)"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _RawCase(self.backend, problem, sets, functional=True)


class OursLaunch(OursOptimizer):
    """The backend's kernel launch with precomputed constants: the step minus the host overhead."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} launch"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _RawCase(self.backend, problem, sets, functional=False)


class _RawCase(_BackendCase):
    """State arrays owned here; steps through ``adam_step`` or straight through ``be.launch``.

    Half params launch the ``/half`` kernel as ``Adam`` does: on the 16-bit patterns, with the
    float32 master in front and the half param last when there are master weights.
    """

    def __init__(self, backend: str, problem: Problem, sets: int, functional: bool) -> None:
        super().__init__(backend, problem, sets)
        self.functional = functional
        be, spec, master = self.be, problem.spec, problem.master
        state_dtype = np.float32 if master else np.uint16 if self.bits16 else problem.dtype
        self.state_arrays = [[[be.zeros_like(p, state_dtype) for _ in spec.state] for p in params]
                             for params in self.params]
        self.masters = [[_to_backend(be, x.astype(np.float32)) for x in problem.split(problem.p0)]
                        for _ in range(sets)] if master else None
        self.steps = [0] * sets
        h = problem.spec.hyper
        self.kwargs = {k: v for k, v in _adam_kwargs(h).items() if k != "amsgrad"}
        # Constants of the verified steps, then the last of them reused: the launch must not pay for
        # them, and the kernel's cost does not depend on their values.
        self.constants = [h.constants(t, problem.compute_dtype) for t in range(1, VERIFY_STEPS + 1)]
        self.rule = f"{spec.rule}/half" if problem.half else spec.rule
        self.extra: list = []  # per set and tensor: the half kernels' (format, stochastic, seed, counter), p16
        self.launch_args = []
        for k, (params, grads, states) in enumerate(zip(self.params, self.grads, self.state_arrays)):
            args, extra = [], []
            for j, (p, g, st) in enumerate(zip(params, grads, states)):
                first = be.flat(self.masters[k][j]) if master else self.kernel_view(p)
                args.append((first, self.kernel_view(g), *(self.kernel_view(s) for s in st)))
                lp = (_half_format_code(problem.dtype), 0, 0, 0)
                extra.append((lp, self.kernel_view(p)) if problem.half else ())
            self.launch_args.append(args)
            self.extra.append(extra)

    def step(self, k: int) -> None:
        t = self.steps[k] = self.steps[k] + 1
        if self.functional:
            from gpuadam import adam_step

            for p, g, st in zip(self.params[k], self.grads[k], self.state_arrays[k]):
                adam_step(p, g, *st, step=t, backend=self.backend, **self.kwargs)
        else:
            launch, rule = self.be.launch, self.rule
            c = self.constants[min(t, VERIFY_STEPS) - 1]
            for arrays, extra in zip(self.launch_args[k], self.extra[k]):
                launch(rule, arrays, c, *extra)

    def state(self) -> dict[str, np.ndarray]:
        problem = self.problem
        out = {"p": self._host(self.params[0], problem.dtype)}
        for j, name in enumerate(problem.spec.state):
            out[name] = self._host([st[j] for st in self.state_arrays[0]], problem.storage(name))
        if self.masters is not None:
            out["w"] = self._host(self.masters[0])
        return out


class Ceiling(Implementation):
    """The same-bytes kernel: p, m, v = g, p, m + v (AMSGrad also x = x + v); see (a)."""

    group = "ceiling"
    storage_ulps = 0  # it computes nothing that rounds: its results are exact

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.device = _device_of(backend)
        self.name = f"ceiling {backend} (same bytes, no math)"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _CeilingCase(self.backend, problem, sets)

    def initial(self, problem: Problem, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: x[idx].astype(np.float64) for k, x in _ceiling_start(problem).items()
                if k in ("p", "w" if problem.master else "p", *problem.spec.state)}

    def expected_step(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                      t: int) -> dict[str, np.ndarray]:
        # In the arrays' own storage, where the ceiling's sums are exact (16-bit patterns wrap).
        def stored(name: str) -> np.ndarray:
            return before[name].astype(_ceiling_storage(problem, name))

        g = g.view(np.uint16) if problem.half else g
        m, v = stored("m"), stored("v")
        if problem.master:
            out = {"w": m, "m": stored("w"), "v": m + v, "p": g}
        else:
            out = {"p": g, "m": stored("p"), "v": m + v}
        if "vmax" in problem.spec.state:
            out["vmax"] = stored("vmax") + v
        return {k: x.astype(np.float64) for k, x in out.items()}


def _ceiling_storage(problem: Problem, name: str) -> np.dtype:
    """What the ceiling moves array ``name`` as: 16-bit patterns for half storage."""
    dtype = problem.storage(name)
    return np.dtype(np.uint16) if is_half(dtype) else dtype


def _ceiling_start(problem: Problem) -> dict[str, np.ndarray]:
    """The ceiling's arrays at the start, as it moves them. Random state too (a sum of zeros would
    be a cheaper kind of traffic on some hardware)."""
    p0, g1, g2 = problem.p0, problem.g1, problem.g2
    if not problem.half:
        return {"p": p0, "m": g2, "v": p0 * p0, "vmax": g1 * g1}
    bits = {"p": p0.view(np.uint16)}
    if not problem.master:
        return {**bits, "m": g2.view(np.uint16), "v": p0.view(np.uint16) ^ g1.view(np.uint16),
                "vmax": g1.view(np.uint16)}
    w, g1, g2 = (x.astype(np.float32) for x in (p0, g1, g2))
    return {**bits, "w": w, "m": g2, "v": w * w, "vmax": g1 * g1}


class _CeilingCase(_BackendCase):
    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        super().__init__(backend, problem, sets)
        master = problem.master
        self.kernel = ceiling_kernel(backend, problem.spec.rule, master)
        start = _ceiling_start(problem)
        self.names = ("w", *problem.spec.state) if master else problem.spec.state
        be = self.be
        self.arrays = [{name: [_to_backend(be, part) for part in problem.split(start[name])] for name in self.names}
                       for _ in range(sets)]
        self.args = []
        for params, grads, arrays in zip(self.params, self.grads, self.arrays):
            args = []
            for j, (p, g) in enumerate(zip(params, grads)):
                own = [be.flat(arrays[name][j]) for name in self.names]  # w first with master weights
                g = self.kernel_view(g)
                args.append((own[0], g, *own[1:], self.kernel_view(p)) if master else
                            (self.kernel_view(p), g, *own))
            self.args.append(args)

    def step(self, k: int) -> None:
        for arrays in self.args[k]:
            self.kernel(*arrays)

    def state(self) -> dict[str, np.ndarray]:
        bits = np.uint16 if self.problem.half else None
        out = {"p": self._host(self.params[0], bits)}
        for name in self.names:
            out[name] = self._host(self.arrays[0][name])
        return out


# --- peers ---------------------------------------------------------------------------------


class NumpyPeer(Implementation):
    """NumPy at its best: in place, ``out=`` everywhere, blocked so the scratch stays in cache.

    NumPy ufuncs are binary, so an expression of a dozen operations needs scratch space: two
    blocks of ``NUMPY_BLOCK`` elements, allocated once (nothing the size of the parameters).
    Single-threaded, as NumPy's elementwise ufuncs are.
    """

    name = "numpy (in place, blocked)"
    backend = "numpy"

    def unavailable(self, problem: Problem) -> str | None:
        if problem.dtype.name == "bfloat16":
            try:
                import ml_dtypes  # noqa: F401
            except ImportError:
                return "bfloat16 on the host needs ml_dtypes"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _NumpyCase(problem)


def numpy_adam(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, vmax: np.ndarray | None,
               c: tuple, s1: np.ndarray, s2: np.ndarray) -> None:
    """One Adam step in place with the kernels' constants ``c``, block by block through ``s1, s2``."""
    # The layout of kernels.rules; entries past the eleventh (e.g. a skip flag) are not needed here.
    grad_mul, wd_l2, b1, omb1, b2, omb2, decay, step_size, inv_sqrt_bc2, eps, eps_root_bc2 = c[:11]
    plain_grad = grad_mul == 1 and wd_l2 == 0
    for lo in range(0, p.size, s1.size):
        hi = min(p.size, lo + s1.size)
        pb, gb, mb, vb = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        t1, t2 = s1[: hi - lo], s2[: hi - lo]
        if not plain_grad:  # the gradient with sign and L2 decay folded in
            np.multiply(gb, grad_mul, out=t1)
            np.multiply(pb, wd_l2, out=t2)
            gb = np.add(t1, t2, out=t1)
        mb *= b1
        mb += np.multiply(gb, omb1, out=t2)
        vb *= b2
        np.multiply(gb, gb, out=t2)
        t2 *= omb2
        vb += t2
        if vmax is not None:
            vb = np.maximum(vmax[lo:hi], vb, out=vmax[lo:hi])
        if eps_root_bc2:
            np.sqrt(np.add(vb, eps_root_bc2, out=t2), out=t2)
        else:
            np.sqrt(vb, out=t2)
        t2 *= inv_sqrt_bc2
        t2 += eps
        np.divide(mb, t2, out=t2)
        t2 *= step_size
        if decay != 1:
            pb *= decay
        pb -= t2


class _NumpyCase(Case):
    """Half storage: each block widened to float32 scratch, stepped there, rounded back (NumPy's and
    ml_dtypes' casts round to nearest even); with master weights only g is widened and p rounded."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.p = problem.p0.copy()
        self.g = problem.g1.copy()
        self.st = {name: np.zeros(problem.n, problem.storage(name)) for name in problem.spec.state}
        if problem.master:
            self.st["w"] = problem.p0.astype(np.float32)
        block = min(NUMPY_BLOCK, max(problem.sizes))
        compute = problem.compute_dtype
        self.s1, self.s2 = np.empty(block, compute), np.empty(block, compute)
        # the arrays the math reads, in the order numpy_adam takes them; the master stands in for p
        self.names = ("w" if problem.master else "p", "g", "m", "v", "vmax")
        self.wide = {name: np.empty(block, compute) for name in self.names
                     if self._array(name) is not None and is_half(self._array(name).dtype)}
        self.t = 0

    def _array(self, name: str) -> np.ndarray | None:
        return {"p": self.p, "g": self.g}.get(name, self.st.get(name))

    def step(self, k: int) -> None:
        self.t += 1
        problem = self.problem
        c = problem.spec.hyper.constants(self.t, problem.compute_dtype)
        arrays = [self._array(name) for name in self.names]
        for lo, hi in zip(*_bounds(problem.sizes, self.s1.size)):
            blocks = [None if a is None else a[lo:hi] for a in arrays]
            if self.wide:
                for j, name in enumerate(self.names):
                    if name in self.wide:
                        blocks[j] = _widen(blocks[j], self.wide[name][: hi - lo])
            numpy_adam(*blocks, c, self.s1, self.s2)
            for j, name in enumerate(self.names):
                if name in self.wide and name != "g":
                    np.copyto(arrays[j][lo:hi], blocks[j], casting="unsafe")
            if problem.master:
                np.copyto(self.p[lo:hi], blocks[0], casting="unsafe")

    def set_grad(self, g: np.ndarray) -> None:
        np.copyto(self.g, g)

    def state(self) -> dict[str, np.ndarray]:
        return {"p": self.p, **self.st}


def _bounds(sizes: tuple[int, ...], block: int) -> tuple[list[int], list[int]]:
    """Block bounds that never cross a tensor boundary: each tensor is stepped on its own."""
    los, his, start = [], [], 0
    for size in sizes:
        for lo in range(start, start + size, block):
            los.append(lo)
            his.append(min(start + size, lo + block))
        start += size
    return los, his


def _widen(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.copyto(out, x, casting="unsafe")
    return out


def _torch() -> Any:
    import torch

    return torch


def _to_torch(torch: Any, x: np.ndarray) -> Any:
    """A CPU tensor holding a copy of ``x`` (bfloat16 through its bits: NumPy has no such type)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _from_torch(torch: Any, t: Any) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchPeer(Implementation):
    """``torch.optim.Adam``/``AdamW`` with ``foreach=True`` or ``fused=True``."""

    backend = "torch"

    def __init__(self, mode: str, device: str) -> None:
        self.mode, self.torch_device = mode, device
        self.device = CPU if device == "cpu" else GPU
        self.name = f"torch {mode} ({device})"
        self.launches = "one" if mode == "fused" else "grouped"
        self.half_arithmetic = mode == "foreach"  # fused computes half params in float32, as we do

    def unavailable(self, problem: Problem) -> str | None:
        try:
            torch = _torch()
        except Exception as exc:
            return f"torch not importable ({type(exc).__name__}: {exc})"
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return "torch has no CUDA device here"
        if problem.master:
            return "torch.optim keeps no float32 master weights (its half params keep half state)"
        h = problem.spec.hyper
        if h.eps_root or not h.bias_correction:
            return "torch.optim.Adam has no eps_root and always corrects the bias"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _TorchCase(self, problem, sets)


class _TorchCase(Case):
    def __init__(self, impl: TorchPeer, problem: Problem, sets: int) -> None:
        torch = self.torch = _torch()
        self.problem, self.sets, self.device = problem, sets, impl.torch_device
        self.events = "torch" if impl.torch_device == "cuda" else None
        h = problem.spec.hyper
        cls = torch.optim.AdamW if problem.spec.name == "adamw" else torch.optim.Adam
        self.params, self.opts = [], []
        for _ in range(sets):
            params = []
            for p, g in zip(problem.split(problem.p0), problem.split(problem.g1)):
                t = torch.nn.Parameter(_to_torch(torch, p).to(self.device))
                t.grad = _to_torch(torch, g).to(self.device)
                params.append(t)
            self.params.append(params)
            self.opts.append(cls(
                params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad,
                maximize=h.maximize, **{impl.mode: True},
            ))

    def step(self, k: int) -> None:
        self.opts[k].step()

    def set_grad(self, g: np.ndarray) -> None:
        for t, part in zip(self.params[0], self.problem.split(g)):
            t.grad.copy_(_to_torch(self.torch, part))

    def state(self) -> dict[str, np.ndarray]:
        def host(ts: Sequence[Any]) -> np.ndarray:
            return np.concatenate([_from_torch(self.torch, t).reshape(-1) for t in ts])

        opt, params = self.opts[0], self.params[0]
        out = {"p": host(params)}
        for name, short in STATE_NAMES.items():
            if name in opt.state[params[0]]:
                out[short] = host([opt.state[t][name] for t in params])
        return out

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class OptaxPeer(Implementation):
    """``optax.adam``/``adamw`` under ``jax.jit`` with the params and state buffers donated."""

    backend = "optax"

    def __init__(self, device: str) -> None:
        self.jax_device = device
        self.device = CPU if device == "cpu" else GPU
        self.name = f"optax (jax.jit, donated, {device})"
        self.launches = "one (XLA fuses)"
        self.half_arithmetic = True  # its moments and update in the params' dtype

    def unavailable(self, problem: Problem) -> str | None:
        try:
            import jax
            import optax  # noqa: F401
        except Exception as exc:
            return f"jax/optax not importable ({type(exc).__name__}: {exc})"
        if self.jax_device == "gpu" and not any(d.platform == "gpu" for d in jax.devices()):
            return "jax has no GPU here"
        if problem.master:
            return "optax.adam keeps no float32 master weights (its moments take the params' dtype)"
        h = problem.spec.hyper
        if h.amsgrad:  # optax.amsgrad keeps the max of the bias-corrected nu, PyTorch of the raw one
            return "optax's AMSGrad is a different algorithm (max of the bias-corrected second moment)"
        if h.maximize or not h.bias_correction or (h.weight_decay and not h.decoupled_weight_decay):
            return "optax.adam has no maximize, L2 decay or bias_correction=False"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OptaxCase(self, problem, sets)


class _OptaxCase(Case):
    def __init__(self, impl: OptaxPeer, problem: Problem, sets: int) -> None:
        import jax
        import optax

        if problem.dtype == np.float64:
            jax.config.update("jax_enable_x64", True)
        self.jax, self.problem, self.sets = jax, problem, sets
        device = next(d for d in jax.devices() if d.platform == impl.jax_device)
        h = problem.spec.hyper
        if problem.spec.name == "adamw":
            tx = optax.adamw(h.lr, h.beta1, h.beta2, h.eps, h.eps_root, weight_decay=h.weight_decay)
        else:
            tx = optax.adam(h.lr, h.beta1, h.beta2, h.eps, h.eps_root)

        def step(params: Any, state: Any, grads: Any) -> tuple:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self._step = jax.jit(step, donate_argnums=(0, 1))

        def put(x: np.ndarray) -> list:
            return [jax.device_put(part, device) for part in problem.split(x)]

        self.params = [put(problem.p0) for _ in range(sets)]
        self.states = [tx.init(p) for p in self.params]
        self.grads = [put(problem.g1) for _ in range(sets)]
        self.put = put

    def step(self, k: int) -> None:
        self.params[k], self.states[k] = self._step(self.params[k], self.states[k], self.grads[k])

    def set_grad(self, g: np.ndarray) -> None:
        self.grads[0] = self.put(g)

    def state(self) -> dict[str, np.ndarray]:
        adam = next(s for s in self.states[0] if hasattr(s, "mu"))

        def host(xs: Sequence[Any]) -> np.ndarray:
            return np.concatenate([np.asarray(x).reshape(-1) for x in xs])

        return {"p": host(self.params[0]), "m": host(adam.mu), "v": host(adam.nu)}

    def sync(self) -> None:
        self.jax.block_until_ready(self.params)


class DeepSpeedPeer(Implementation):
    """DeepSpeed's ``DeepSpeedCPUAdam`` (its C++ AVX op, built by DeepSpeed on first use)."""

    name = "deepspeed cpu_adam"
    backend = "deepspeed"
    launches = "one call per group"
    # DeepSpeed forms 1 - beta2 in float32 from float32(beta2): 1.3e-5 relative error in v (about
    # 100 ulps), an error of constants, not of the algorithm; a wrong rule is off by far more.
    tolerance_eps = 512
    note = "checked at 512 eps, not 4: it rounds beta2 to float32 before 1 - beta2 (v off by 1.3e-5 relative)"

    def unavailable(self, problem: Problem) -> str | None:
        try:
            import deepspeed.ops.adam  # noqa: F401
        except Exception as exc:
            return f"deepspeed not importable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
        h = problem.spec.hyper
        if h.amsgrad or h.maximize or h.eps_root or not h.bias_correction:
            return "DeepSpeedCPUAdam has no amsgrad, maximize or eps_root"
        if problem.dtype != np.float32:
            return "DeepSpeedCPUAdam keeps float32 parameters"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _DeepSpeedCase(problem)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what C++ code prints to stdout (DeepSpeed's banner) to stderr, away from the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _DeepSpeedCase(_TorchCase):
    def __init__(self, problem: Problem) -> None:
        import logging

        torch = self.torch = _torch()
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        with _stdout_to_stderr():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.problem, self.sets, self.device, self.events = problem, 1, "cpu", None
            h = problem.spec.hyper
            params = []
            for p, g in zip(problem.split(problem.p0), problem.split(problem.g1)):
                t = torch.nn.Parameter(torch.from_numpy(p.copy()))
                t.grad = torch.from_numpy(g.copy())
                params.append(t)
            self.params = [params]
            self.opts = [DeepSpeedCPUAdam(
                params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay,
                adamw_mode=h.decoupled_weight_decay, bias_correction=h.bias_correction,
            )]


def our_implementations(backend: str) -> list[Implementation]:
    return [Ceiling(backend), OursOptimizer(backend), OursLaunch(backend)]


def peer_implementations(devices: set[str]) -> list[Implementation]:
    """Every peer for the devices benchmarked; those not installed report themselves unavailable."""
    peers: list[Implementation] = []
    if CPU in devices:
        peers += [NumpyPeer(), TorchPeer("foreach", "cpu"), TorchPeer("fused", "cpu"), OptaxPeer("cpu"),
                  DeepSpeedPeer()]
    if GPU in devices:
        peers += [TorchPeer("foreach", "cuda"), TorchPeer("fused", "cuda"), OptaxPeer("gpu")]
    return peers


# =============================================================================================
# (c) timing and (d) verification


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
        torch = _torch()
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


#: (mantissa bits, exponent of the smallest normal) of the half formats
_HALF_FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}


def verify(entry: Entry) -> tuple[float, str]:
    """Run VERIFY_STEPS steps on set 0, each compared with the float64 reference's step from the
    implementation's own values before it: the worst error as a fraction of its budget, and where.

    Per array, the budget is ``tolerance_eps`` eps of the compute dtype of ``max|x| + max|change|``
    (the math), plus, for half storage, ``storage_ulps`` units in the last place of the stored
    format at each element (the rounding: a max-norm budget would be blind there, an update is
    smaller than the params' ulp). Stepping from its own values keeps one step's rounding from
    compounding into the next step's budget.
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
        want = impl.expected_step(problem, before, g[idx], t)
        have = {}
        for name, target in want.items():
            if name not in got:
                raise KeyError(f"the implementation does not expose its {name!r}")
            x = have[name] = np.asarray(got[name]).reshape(-1)[idx].astype(np.float64)
            err = _step_error(impl, problem, name, x, target, before[name])
            if not err <= worst:
                bad = ~np.isfinite(x) & np.isfinite(target)
                worst = math.inf if np.isnan(err) else err
                where = (f"{name} at step {t} holds inf/NaN where the reference is finite" if bad.any() else
                         f"{name} at step {t}: error {err:.3g}x its budget")
        before = {**before, **have}
    return worst, where


def _step_error(impl: Implementation, problem: Problem, name: str, have: np.ndarray, want: np.ndarray,
                start: np.ndarray) -> float:
    """max |have - want| over its budget (see ``verify``)."""
    storage = problem.storage(name)
    half_math = impl.half_arithmetic and is_half(storage)
    eps = 2.0 ** -_HALF_FORMATS[storage.name][0] if half_math else float(np.finfo(problem.compute_dtype).eps)
    budget = impl.tolerance_eps * eps * (np.abs(want).max() + np.abs(want - start).max())
    if impl.storage_ulps and is_half(storage) and not half_math:
        budget = budget + impl.storage_ulps * ulp(want, storage)
    err = (np.abs(have - want) / np.maximum(budget, np.finfo(np.float64).tiny)).max()
    return float(err) if np.isfinite(err) else math.inf


def ulp(x: np.ndarray, dtype: Any) -> np.ndarray:
    """The unit in the last place of half-precision ``dtype`` at each value of ``x`` (float64)."""
    bits, emin = _HALF_FORMATS[np.dtype(dtype).name]
    _, e = np.frexp(np.abs(x))  # |x| = f * 2**e, 0.5 <= f < 1
    exponent = np.where(x == 0, emin, np.maximum(e - 1, emin))
    return np.ldexp(1.0, exponent - bits)


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


def run_entries(entries: list[Entry], config: Config, progress: Progress) -> None:
    """Set up, verify, then time ``entries`` (interleaved round-robin); fills each entry in place."""
    l2 = _gpu_l2_bytes() if any(e.impl.device == GPU for e in entries) else L2_DEFAULT_BYTES
    live = []
    for e in entries:
        progress.note(f"{e.impl.name} {e.problem.label}")
        reason = e.impl.unavailable(e.problem)
        if reason is not None:
            e.status, e.reason = "unavailable", reason
            progress.advance(1 + config.repeat)
            continue
        try:
            e.sets = _buffer_sets(e, config, l2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. JAX on donation, torch on fused defaults
                e.case = e.impl.setup(e.problem, e.sets)
                e.verify_error, where = verify(e)
        except Exception as exc:
            e.status, e.reason, e.case = "error", _reason(exc), None
            progress.advance(1 + config.repeat)
            continue
        if not e.verify_error <= 1.0:
            e.status, e.case = "failed", None
            e.reason = f"disagrees with the float64 reference: {where}"
            progress.advance(1 + config.repeat)
            continue
        e.verified = True
        e.timer = "cuda-events" if e.case.events and not e.host_timer else "perf_counter"
        # Warm up every buffer set, then size a sample so the timer's resolution does not matter.
        for k in range(e.case.sets):
            e.case.step(k)
        e.case.sync()
        first = _sample(e, 1)
        e.steps_per_sample = int(min(config.max_steps, max(1, math.ceil(config.min_time / max(first, 1e-9)))))
        live.append(e)
        progress.advance(1)
    for r in range(config.repeat):
        shift = r % max(1, len(live))  # rotate the order so no implementation always runs first
        for e in live[shift:] + live[:shift]:
            e.samples.append(_sample(e, e.steps_per_sample))
            progress.advance(1)
    for e in live:
        e.status, e.case = "ok", None


# =============================================================================================
# Configuration and the suites


@dataclass
class Config:
    """What to benchmark and how hard; ``Config.quick()`` for a smoke run."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    sweep: bool = True
    many: bool = False
    overhead: bool = True
    backends: tuple[str, ...] | None = None  # None: every available one
    optimizers: tuple[str, ...] = ("adam",)
    dtype: str = "float32"
    master_weights: bool = False  # half params with float32 master weights and state
    peers: bool = True
    repeat: int = 7
    min_time: float = 0.02  # seconds per sample
    max_steps: int = 10_000  # steps per sample at most
    max_sets: int = 64  # GPU buffer sets at most
    many_count: int = MANY_COUNT
    many_range: tuple[int, int] = MANY_RANGE
    seed: int = 0
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_defaults(cls, **kw: Any) -> Config:
        base = dict(sizes=QUICK_SIZES, repeat=3, min_time=0.002, max_sets=4, many_count=40,
                    many_range=(100, 1000), quick=True)
        return cls(**{**base, **kw})

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.master_weights and self.dtype not in LOW_PRECISION:
            raise ValueError(f"--master-weights: float32 master weights are for float16/bfloat16 params, "
                             f"got --dtype {self.dtype}")
        if self.dtype == "bfloat16":
            try:
                numpy_dtype(self.dtype)
            except ImportError:
                raise ValueError("--dtype bfloat16 needs ml_dtypes on the host: pip install 'gpuadam[half]'") from None
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(f"--optimizers: unknown {unknown}; expected some of {', '.join(OPTIMIZERS)}")
        if self.backends is not None:
            bad = [b for b in self.backends if b not in backends.NAMES]
            if bad or not self.backends:
                raise ValueError(f"--backends: unknown {bad}; expected some of {', '.join(backends.NAMES)}")
        if self.repeat < 1:
            raise ValueError(f"--repeat: expected >= 1, got {self.repeat}")


class Progress:
    """A progress bar on stderr: tqdm when installed, else one rewritten line."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
                self.bar = tqdm(total=total, desc="gpuadam bench", file=sys.stderr, leave=False, bar_format=fmt)
            except ImportError:
                pass

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:48], refresh=False)
        self._text = text

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            pct = 100 * self.done // max(1, self.total)
            print(f"\rgpuadam bench: {pct:3d}% ({self.done}/{self.total}) {getattr(self, '_text', '')[:48]:48s}",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def selected_backends(config: Config) -> tuple[list[str], dict[str, str]]:
    """The backends to benchmark, and the reason each requested-but-unavailable one is left out."""
    statuses = backends.available_backends()
    wanted = config.backends or tuple(n for n in backends.NAMES if statuses[n].available)
    use = [n for n in wanted if statuses[n].available]
    skipped = {n: statuses[n].reason for n in wanted if not statuses[n].available}
    return use, skipped


@dataclass
class Batch:
    """Entries alive (and interleaved) together; the problems' data is made only when it runs."""

    suite: str
    problems: dict[str, Callable[[], Problem]]  # key -> factory
    items: list[tuple[Implementation, str, str]]  # (implementation, problem key, layout)

    def entries(self) -> list[Entry]:
        made = {key: make() for key, make in self.problems.items()}
        return [Entry(self.suite, impl, made[key], layout, host_timer=self.suite == "overhead")
                for impl, key, layout in self.items]


def build_batches(config: Config, use: list[str], extra: Sequence[Implementation] = ()) -> list[Batch]:
    """What to run, in batches: each size of each optimizer, the many-tensor case, the overhead."""
    dtype = numpy_dtype(config.dtype)
    master = config.master_weights
    devices = {_device_of(b) for b in use}
    peers = peer_implementations(devices) if config.peers else []
    others = peers + list(extra)
    batches: list[Batch] = []
    for opt_name in config.optimizers:
        spec = OPTIMIZERS[opt_name]
        if config.sweep:
            for n in config.sizes:
                make = functools.partial(make_problem, spec, dtype, (n,), config.seed, master)
                impls = [i for b in use for i in our_implementations(b)] + others
                batches.append(Batch("sizes", {"one": make}, [(i, "one", "one tensor") for i in impls]))
        if config.many:
            sizes = many_sizes(config.many_count, *config.many_range, config.seed)
            problems = {"one": functools.partial(make_problem, spec, dtype, (sum(sizes),), config.seed, master),
                        "many": functools.partial(make_problem, spec, dtype, sizes, config.seed, master)}
            items = []
            for b in use:
                items += [(Ceiling(b), "one", "one tensor"), (OursOptimizer(b), "one", "one tensor"),
                          (OursOptimizer(b), "many", "separate arrays"), (OursFlatBuffer(b), "many", "flat buffer")]
            items += [(impl, "many", "separate arrays") for impl in others]
            batches.append(Batch("many", problems, items))
    if config.overhead:
        spec = OPTIMIZERS[config.optimizers[0]]
        make = functools.partial(make_problem, spec, dtype, (TINY,), config.seed, master)
        impls: list[Implementation] = []
        for b in use:
            impls += [OursOptimizer(b), OursFunctional(b), OursLaunch(b)]
        impls += [p for p in peers if isinstance(p, TorchPeer)]
        batches.append(Batch("overhead", {"one": make}, [(i, "one", "one tensor") for i in impls]))
    return batches


def run(config: Config, extra: Sequence[Implementation] = ()) -> dict:
    """Run the benchmark described by ``config`` and return the JSON-ready report.

    ``extra``: more implementations to run beside ours and the peers (verified and timed the same way).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # too late if an OpenMP runtime already started
    config.check()
    started = time.time()
    before = _cpu_snapshot()
    use, skipped = selected_backends(config)
    if not use:
        raise RuntimeError("no backend to benchmark: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    batches = build_batches(config, use, extra)
    progress = Progress(sum(len(b.items) for b in batches) * (1 + config.repeat), config.progress)
    done: list[Entry] = []
    try:
        for batch in batches:  # one batch alive at a time: the 64M-element buffers add up
            entries = batch.entries()
            run_entries(entries, config, progress)
            for e in entries:  # keep the figures, drop the data
                e.problem = _shell(e.problem)
            done += entries
    finally:
        progress.close()
    doc = report(config, done, skipped, time.time() - started)
    doc["machine"]["other_processes_cpus"] = _others_cpus(before, _cpu_snapshot())
    return doc


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process, wall seconds), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    t = os.times()  # with the children waited for (DeepSpeed runs ninja to load its op)
    own = t.user + t.system + t.children_user + t.children_system
    return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()


def _others_cpus(a: tuple | None, b: tuple | None) -> float | None:
    """How many CPUs other processes kept busy, on average, between two snapshots."""
    if a is None or b is None or b[2] <= a[2]:
        return None
    return round(max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]), 3)


def _shell(problem: Problem) -> Problem:
    """The problem without its arrays (the report needs its shape, not its data)."""
    empty = np.empty(0, problem.dtype)
    return Problem(problem.spec, problem.dtype, problem.sizes, empty, empty, empty, np.empty(0, np.int64),
                   problem.master)


# =============================================================================================
# (e) reporting


def _ceiling_for(entry: Entry, entries: list[Entry]) -> Entry | None:
    """The ceiling this entry is compared with: its own backend's, else the best on its device."""
    ceilings = [c for c in entries if c.impl.group == "ceiling" and c.status == "ok"
                and c.impl.device == entry.impl.device and c.problem.spec is entry.problem.spec
                and c.problem.n == entry.problem.n]
    same = [c for c in ceilings if c.impl.backend == entry.impl.backend]
    if same:
        return same[0]
    return min(ceilings, key=lambda c: c.median(), default=None)


def _row(e: Entry, entries: list[Entry]) -> dict:
    row = {
        "suite": e.suite, "optimizer": e.problem.spec.name, "dtype": str(e.problem.dtype),
        "master_weights": e.problem.master,
        "size": e.problem.n, "tensors": len(e.problem.sizes), "layout": e.layout,
        "implementation": e.impl.name, "group": e.impl.group, "backend": e.impl.backend, "device": e.impl.device,
        "launches": e.impl.launches, "status": e.status, "reason": e.reason, "note": e.impl.note_for(e.problem) or None,
        "verified": e.verified, "verify_error": e.verify_error, "verify_tolerance_eps": e.impl.tolerance_eps,
        "verify_storage_ulps": e.impl.storage_ulps if e.problem.half else None,
        "timer": e.timer, "event_timing": e.event_timing,
        "buffer_sets": e.sets, "steps_per_sample": e.steps_per_sample, "samples_s": e.samples,
        "bytes_per_step": e.problem.bytes_per_step,
        "median_s": None, "min_s": None, "max_s": None, "bandwidth_gbs": None, "bandwidth_gbs_best": None,
        "ceiling_fraction": None,
    }
    if e.samples:
        med, lo, hi = e.median(), min(e.samples), max(e.samples)
        row.update(median_s=med, min_s=lo, max_s=hi, bandwidth_gbs=e.problem.bytes_per_step / med / 1e9,
                   bandwidth_gbs_best=e.problem.bytes_per_step / lo / 1e9)
        ceiling = _ceiling_for(e, entries) if e.suite != "overhead" else None
        if ceiling is not None:
            row["ceiling_fraction"] = ceiling.median() / med
    return row


def _ratios(rows: list[dict]) -> list[dict]:
    """Per (suite, optimizer, size): ours against the ceiling and against every peer (median times)."""
    out = []
    keys = sorted({(r["suite"], r["optimizer"], r["size"], r["device"]) for r in rows if r["suite"] == "sizes"})
    for suite, opt, size, device in keys:
        same = [r for r in rows if (r["suite"], r["optimizer"], r["size"], r["device"]) == (suite, opt, size, device)
                and r["median_s"]]
        ours = [r for r in same if r["group"] == "ours" and r["implementation"].endswith("Adam.step")]
        for o in ours:
            entry = {"optimizer": opt, "size": size, "device": device, "ours": o["implementation"],
                     "ours_over_ceiling": o["ceiling_fraction"],
                     "peer_time_over_ours": {r["implementation"]: r["median_s"] / o["median_s"]
                                             for r in same if r["group"] == "peer"}}
            out.append(entry)
    return out


def machine_info() -> dict:
    """CPU, cores, threads, GPU and library versions, read without importing anything heavy."""
    from importlib import metadata

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_model"] = model
    if hasattr(os, "getloadavg"):  # anything else running skews a 2-core measurement: say so
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_count"] = os.cpu_count()
    info["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    caches = {}
    for index in sorted(os.listdir("/sys/devices/system/cpu/cpu0/cache")) if os.path.isdir(
            "/sys/devices/system/cpu/cpu0/cache") else []:
        base = f"/sys/devices/system/cpu/cpu0/cache/{index}"
        try:
            level = open(f"{base}/level").read().strip()
            kind = open(f"{base}/type").read().strip()
            size = open(f"{base}/size").read().strip()
            shared = open(f"{base}/shared_cpu_list").read().strip()
        except OSError:
            continue
        caches[f"L{level} {kind}"] = f"{size} (shared by CPUs {shared})"
    info["caches"] = caches
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import numba

    info["numba_threads"] = numba.get_num_threads()
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        info["numba_threading_layer"] = None
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    info["env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                    "NUMBA_ENABLE_CUDASIM", "GPUADAM_BACKEND")}
    gpus = []
    for name, st in backends.available_backends().items():
        if name != "numba-cpu":
            gpus.append({"backend": name, "available": st.available, "detail": st.reason})
    info["gpu"] = gpus
    versions = {}
    for dist in ("gpuadam", "numpy", "numba", "llvmlite", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch",
                 "jax", "jaxlib", "optax", "deepspeed"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def report(config: Config, entries: list[Entry], skipped: dict[str, str], seconds: float) -> dict:
    """The JSON document: machine, configuration, accounting, every row, and the ratios."""
    dtype = numpy_dtype(config.dtype)
    rows = [_row(e, entries) for e in entries]
    return {
        "schema": SCHEMA,
        "machine": machine_info(),
        "config": {
            "sizes": list(config.sizes) if config.sweep else [], "many": config.many, "overhead": config.overhead,
            "backends": sorted({e.impl.backend for e in entries if e.impl.group == "ours"}),
            "backends_unavailable": skipped, "optimizers": list(config.optimizers), "dtype": config.dtype,
            "master_weights": config.master_weights,
            "peers": config.peers, "repeat": config.repeat, "min_time_s": config.min_time,
            "max_buffer_sets": config.max_sets, "quick": config.quick, "seed": config.seed,
            "many_tensors": config.many_count if config.many else 0, "many_range": list(config.many_range),
            "overhead_elements": TINY, "verify": {
                "steps": VERIFY_STEPS, "sampled_elements": VERIFY_SAMPLE, "tolerance_eps": VERIFY_ULPS,
                "storage_ulps": VERIFY_STORAGE_ULPS,
                "definition": "each step from the implementation's own previous values, against "
                              "gpuadam.reference.adam_reference in float64: |x - ref| <= tolerance_eps * "
                              "eps(compute dtype) * (max|ref| + max|ref - x_before|) [+ storage_ulps * "
                              "ulp(ref) per element for half storage], for p, m, v (vmax, master)",
            },
            "timing": {
                "cpu": "perf_counter around a sample of back-to-back steps, implementations interleaved "
                       "round-robin, median/min/max over repeats",
                "gpu": "CUDA events around the launches after warm-up, buffer sets rotated when the working "
                       "set fits twice in the L2 cache",
                "overhead": f"host perf_counter per step on a {TINY}-element tensor (GPU: synchronised once "
                            "per sample)",
            },
        },
        "accounting": {name: OPTIMIZERS[name].accounting(dtype, config.master_weights)
                       for name in config.optimizers},
        "results": rows,
        "ratios": _ratios(rows),
        "seconds": round(seconds, 2),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}" if x < 1 else f"{x * 1e3:.0f}"


def _storage(doc: dict) -> str:
    config = doc["config"]
    return f"{config['dtype']} + float32 master weights" if config.get("master_weights") else config["dtype"]


def format_table(doc: dict) -> str:
    """The human-readable report: machine, accounting, per-size tables, many-tensors, overhead, ratios."""
    m = doc["machine"]
    lines = [
        f"gpuadam bench  {m['cpu_model']}, {m['cpus_usable']} CPUs, numba {m['numba_threads']} threads "
        f"({m.get('numba_threading_layer') or '-'}), OMP_WAIT_POLICY={m['env'].get('OMP_WAIT_POLICY')}",
    ]
    gpus = [g["detail"] for g in m["gpu"] if g["available"]]
    lines.append(f"GPU: {'; '.join(gpus) if gpus else 'none'}")
    others = m.get("other_processes_cpus")
    if others is not None and others > 0.05:
        lines.append(f"WARNING: other processes kept {others:.2f} CPUs busy during the run: the figures are skewed")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for name, acc in doc["accounting"].items():
        lines.append(f"{name} ({_storage(doc)}): {acc['definition']}")
    for b, why in doc["config"]["backends_unavailable"].items():
        lines.append(f"backend {b}: unavailable ({why})")
    rows = doc["results"]
    head = f"{'size':>10s}  {'implementation':42s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} " \
           f"{'GB/s':>7s} {'ceiling':>8s}"

    def line(r: dict, label: str) -> str:
        if r["status"] != "ok":
            return f"{label:>10s}  {r['implementation']:42s} {r['status'].upper()}: {r['reason']}"
        frac = "-" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.0f}%"
        return (f"{label:>10s}  {r['implementation']:42s} {_ms(r['median_s']):>10s} {_ms(r['min_s']):>9s} "
                f"{_ms(r['max_s']):>9s} {r['bandwidth_gbs']:7.1f} {frac:>8s}")

    sweep = [r for r in rows if r["suite"] == "sizes"]
    for opt in dict.fromkeys(r["optimizer"] for r in sweep):
        lines += ["", f"== {opt}, {_storage(doc)}: time per step, bandwidth at "
                      f"{doc['accounting'][opt]['bytes_per_element']} B/element, fraction of the ceiling", head]
        for r in (r for r in sweep if r["optimizer"] == opt):
            lines.append(line(r, size_label(r["size"])))
    many = [r for r in rows if r["suite"] == "many"]
    if many:
        lines += ["", f"== many tensors: {doc['config']['many_tensors']} tensors of "
                      f"{doc['config']['many_range'][0]}-{doc['config']['many_range'][1]} elements "
                      f"({many[-1]['size']} in all) vs one tensor of the same size", head]
        for r in many:
            lines.append(line(r, r["layout"][:10]))
        ones = {(r["optimizer"], r["backend"]): r for r in many
                if r["layout"] == "one tensor" and r["group"] == "ours" and r["median_s"]}
        for r in many:
            base = ones.get((r["optimizer"], r["backend"])) or next(iter(ones.values()), None)
            if r["median_s"] and base and r is not base and r["group"] != "ceiling":
                lines.append(f"{'':10s}  {r['implementation']} ({r['layout']}): "
                             f"{r['median_s'] / base['median_s']:.2f}x the time of one tensor ({base['backend']})")
    over = [r for r in rows if r["suite"] == "overhead"]
    if over:
        lines += ["", f"== per-step host overhead: a {doc['config']['overhead_elements']}-element tensor",
                  f"{'':10s}  {'path':42s} {'median us':>10s} {'min us':>9s} {'max us':>9s}"]
        for r in over:
            if r["status"] != "ok":
                lines.append(f"{'':10s}  {r['implementation']:42s} {r['status'].upper()}: {r['reason']}")
            else:
                lines.append(f"{'':10s}  {r['implementation']:42s} {r['median_s'] * 1e6:10.1f} "
                             f"{r['min_s'] * 1e6:9.1f} {r['max_s'] * 1e6:9.1f}")
    if any(q["ours_over_ceiling"] is not None or q["peer_time_over_ours"] for q in doc["ratios"]):
        lines += ["", "== ratios (median times, same run): ours/ceiling bandwidth; peer time / our time "
                      "(> 1: we are faster)"]
        for q in doc["ratios"]:
            frac = "-" if q["ours_over_ceiling"] is None else f"{100 * q['ours_over_ceiling']:.0f}%"
            peers = ", ".join(f"{k} {v:.2f}x" for k, v in q["peer_time_over_ours"].items())
            lines.append(f"{q['optimizer']} {size_label(q['size']):>6s} {q['ours']}: {frac} of ceiling; {peers}")
    notes = {r["implementation"]: r["note"] for r in rows if r["note"] and r["status"] == "ok"}
    lines += [""] + [f"note: {k}: {v}" for k, v in notes.items()]
    lines.append(f"({doc['seconds']:.0f} s; every timed implementation was first checked against the "
                 "float64 reference)")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """Bandwidth against size, a line per implementation, the ceiling as a bold dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["suite"] == "sizes" and r["median_s"]]
    panels = list(dict.fromkeys((r["optimizer"], r["device"]) for r in rows)) or [("adam", CPU)]
    fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels), 5), squeeze=False)
    for ax, (opt, device) in zip(axes[0], panels):
        mine = [r for r in rows if (r["optimizer"], r["device"]) == (opt, device)]
        for name in dict.fromkeys(r["implementation"] for r in mine):
            pts = sorted((r["size"], r["bandwidth_gbs"]) for r in mine if r["implementation"] == name)
            xs, ys = zip(*pts)
            if name.startswith("ceiling"):
                ax.plot(xs, ys, "k--", lw=2.5, label=name)
            else:
                ax.plot(xs, ys, "o-", lw=1.5, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor")
        ax.set_ylabel(f"GB/s at {doc['accounting'][opt]['bytes_per_element']} B/element")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{opt} {_storage(doc)} on {device}: bytes the step must move / median time")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    m = doc["machine"]
    fig.suptitle(f"gpuadam bench: {m['cpu_model']}, {m['cpus_usable']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)
        f.write("\n")


def config_from_args(args: Any) -> Config:
    """A ``Config`` from the ``gpuadam bench`` arguments (``--quick`` changes the defaults only)."""
    split = (lambda s: tuple(x.strip() for x in s.split(",") if x.strip()))  # noqa: E731
    kw: dict[str, Any] = dict(
        optimizers=split(args.optimizers), dtype=args.dtype, master_weights=args.master_weights,
        many=args.many, peers=args.peers,
        overhead=not args.no_overhead, progress=not args.no_progress,
        sweep=args.sizes is not None or not args.many,
    )
    if args.sizes is not None:
        kw["sizes"] = parse_sizes(args.sizes)
    if args.backends:
        kw["backends"] = split(args.backends)
    for name, attr in (("repeat", "repeat"), ("min_time", "min_time"), ("max_buffer_sets", "max_sets")):
        if getattr(args, name) is not None:
            kw[attr] = getattr(args, name)
    config = Config.quick_defaults(**kw) if args.quick else Config(**kw)
    config.check()
    return config


def main(args: Any) -> int:
    """``gpuadam bench``: run, print the table, write the JSON and the plot. 1 if ours failed a check."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gpuadam bench: {exc}", file=sys.stderr)
        return 2
    doc = run(config)
    print(format_table(doc))
    if args.json:
        write_json(doc, args.json)
    if args.plot:
        plot(doc, args.plot)
    bad = [r for r in doc["results"] if r["group"] != "peer" and r["status"] in ("failed", "error")]
    return 1 if bad else 0
