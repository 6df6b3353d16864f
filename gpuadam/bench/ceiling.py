"""The same-bytes ceiling: kernels that move exactly the arrays of one step with no math, on
every backend, and the ``Ceiling`` implementation that times them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from gpuadam import lean
from gpuadam.bench.cases import (
    BackendCase,
    Case,
    Implementation,
    device_of,
    lean_refusal,
    lean_unavailable,
    to_backend,
)
from gpuadam.bench.problems import Problem, is_half, lean_bytes_per_step
from gpuadam.kernels.lean_cpu import BLOCKS_PER_CHUNK
from gpuadam.kernels.lean_maps import BLOCK
from gpuadam.kernels.numba_cpu import PARALLEL_MIN

# (a) ceiling kernels: the same loads and stores as a step, and no math the compiler could elide
#
# Adam:    p, m, v = g, p, m + v              reads p g m v, writes p m v
# AMSGrad: p, m, v, x = g, p, m + v, x + v    reads p g m v x, writes p m v x
# Half state: the same on the 16-bit patterns (integer sums, wrapping). Master weights, float32
# w, m, v (and x) beside the half p and g, as our kernels take them: (w, g, m, v[, x], half_param):
# Adam:    w, m, v, half_param = m, w, m + v, g            reads w g m v, writes w m v half_param
# AMSGrad: w, m, v, x, half_param = m, w, m + v, x + v, g  reads w g m v x, writes w m v x half_param
# Lean state (float32 p and g), the moments in the layout's own storage, arrays in our kernels' order
# (p cannot move into a moment of another type, so it is read by one float32 add):
# int8:     p, mq, vq = p + g, vq, mq + vq per element (uint8, wrapping) and ma, va = va, ma + va
#           per block of BLOCK (float32 absmax): reads p g mq vq ma va, writes p mq vq ma va
# bfloat16: p, m, v = p + g, v, m + v (uint16 bits, wrapping): reads p g m v, writes p m v


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
def _ceiling_adam_master_parallel(w, g, m, v, half_param):
    for i in prange(w.size):
        w[i], m[i], v[i], half_param[i] = m[i], w[i], m[i] + v[i], g[i]


@njit(cache=True)
def _ceiling_adam_master_serial(w, g, m, v, half_param):
    for i in range(w.size):
        w[i], m[i], v[i], half_param[i] = m[i], w[i], m[i] + v[i], g[i]


@njit(parallel=True, cache=True)
def _ceiling_amsgrad_master_parallel(w, g, m, v, x, half_param):
    for i in prange(w.size):
        w[i], m[i], v[i], x[i], half_param[i] = m[i], w[i], m[i] + v[i], x[i] + v[i], g[i]


@njit(cache=True)
def _ceiling_amsgrad_master_serial(w, g, m, v, x, half_param):
    for i in range(w.size):
        w[i], m[i], v[i], x[i], half_param[i] = m[i], w[i], m[i] + v[i], x[i] + v[i], g[i]


@njit(parallel=True, cache=True)
def _ceiling_int8_parallel(p, g, mq, ma, vq, va):
    # whole blocks per parallel chunk, as kernels.lean_cpu's int8 loop takes them; the elements
    # through slices counted from 0, which LLVM vectorises (a loop over computed bounds it did not:
    # 5x slower than the memory)
    per_chunk = BLOCKS_PER_CHUNK * BLOCK
    for chunk in prange((ma.size + BLOCKS_PER_CHUNK - 1) // BLOCKS_PER_CHUNK):
        lo = chunk * per_chunk
        hi = min(p.size, lo + per_chunk)
        _move_codes(p[lo:hi], g[lo:hi], mq[lo:hi], vq[lo:hi])
        for b in range(chunk * BLOCKS_PER_CHUNK, min(ma.size, (chunk + 1) * BLOCKS_PER_CHUNK)):
            ma[b], va[b] = va[b], ma[b] + va[b]


@njit(cache=True)
def _move_codes(p, g, mq, vq):
    for i in range(p.size):
        p[i], mq[i], vq[i] = p[i] + g[i], vq[i], mq[i] + vq[i]


@njit(cache=True)
def _ceiling_int8_serial(p, g, mq, ma, vq, va):
    _move_codes(p, g, mq, vq)
    for b in range(ma.size):
        ma[b], va[b] = va[b], ma[b] + va[b]


@njit(parallel=True, cache=True)
def _ceiling_bf16state_parallel(p, g, m, v):
    for i in prange(p.size):
        p[i], m[i], v[i] = p[i] + g[i], v[i], m[i] + v[i]


@njit(cache=True)
def _ceiling_bf16state_serial(p, g, m, v):
    for i in range(p.size):
        p[i], m[i], v[i] = p[i] + g[i], v[i], m[i] + v[i]


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
        lean.KERNEL["int8"]: _threaded(_ceiling_int8_parallel, _ceiling_int8_serial),
        lean.KERNEL["bfloat16"]: _threaded(_ceiling_bf16state_parallel, _ceiling_bf16state_serial),
    }


def _numba_cuda_ceiling() -> dict[str, Callable]:
    """Numba CUDA ceiling kernels (``ceiling_cuda``, imported only now: it imports numba.cuda)."""
    from gpuadam.bench import ceiling_cuda

    return {rule: functools.partial(ceiling_cuda.launch, rule) for rule in ceiling_cuda.KERNELS}


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
    "adam/master": ("raw uint16 raw_g",
                    "raw float32 raw_w, raw float32 raw_m, raw float32 raw_v, raw uint16 raw_half_param",
                    "const unsigned short g = raw_g[i]; const float w = raw_w[i]; const float m = raw_m[i];\n"
                    "const float s = m + raw_v[i];\n"
                    "raw_w[i] = m; raw_m[i] = w; raw_v[i] = s; raw_half_param[i] = g;"),
    "amsgrad/master": ("raw uint16 raw_g",
                       "raw float32 raw_w, raw float32 raw_m, raw float32 raw_v, raw float32 raw_x, "
                       "raw uint16 raw_half_param",
                       "const unsigned short g = raw_g[i]; const float w = raw_w[i]; const float m = raw_m[i];\n"
                       "const float v = raw_v[i]; const float s = m + v; const float x = raw_x[i] + v;\n"
                       "raw_w[i] = m; raw_m[i] = w; raw_v[i] = s; raw_x[i] = x; raw_half_param[i] = g;"),
    # lean layouts, in the order of gpuadam.lean.NAMES after p: the absmax of block b moves with its
    # first element
    "adam/int8": ("raw float32 raw_g",
                  "raw float32 raw_p, raw uint8 raw_mq, raw float32 raw_ma, raw uint8 raw_vq, raw float32 raw_va",
                  "const float p = raw_p[i] + raw_g[i]; const unsigned char mq = raw_mq[i];\n"
                  "const unsigned char vq = raw_vq[i];\n"
                  "raw_p[i] = p; raw_mq[i] = vq; raw_vq[i] = (unsigned char)(mq + vq);\n"
                  f"if (i % {BLOCK} == 0) {{ const ptrdiff_t b = i / {BLOCK}; const float ma = raw_ma[b];\n"
                  "  const float va = raw_va[b]; raw_ma[b] = va; raw_va[b] = ma + va; }"),
    "adam/bf16state": ("raw float32 raw_g", "raw float32 raw_p, raw uint16 raw_m, raw uint16 raw_v",
                       "const float p = raw_p[i] + raw_g[i]; const unsigned short m = raw_m[i];\n"
                       "const unsigned short v = raw_v[i];\n"
                       "raw_p[i] = p; raw_m[i] = v; raw_v[i] = (unsigned short)(m + v);"),
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
    16-bit patterns for half state), or with ``master`` ``kernel(w, g, m, v[, vmax], half_param)``;
    for a lean layout (``rule`` a ``lean.KERNEL`` name) ``kernel(p, g, *moments)`` in ``lean.NAMES``' order."""
    table = {"numba-cpu": _cpu_ceiling, "numba-cuda": _numba_cuda_ceiling, "cupy": _cupy_ceiling}
    return table[backend]()[f"{rule}/master" if master else rule]


class Ceiling(Implementation):
    """The same-bytes kernel: p, m, v = g, p, m + v (AMSGrad also x = x + v); see (a)."""

    group = "ceiling"
    storage_ulps = 0  # it computes nothing that rounds: its results are exact

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.device = device_of(backend)
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


class _CeilingCase(BackendCase):
    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        super().__init__(backend, problem, sets)
        master = problem.master
        self.kernel = ceiling_kernel(backend, problem.spec.rule, master)
        start = _ceiling_start(problem)
        self.names = ("w", *problem.spec.state) if master else problem.spec.state
        be = self.be
        self.arrays = [{name: [to_backend(be, part) for part in problem.split(start[name])] for name in self.names}
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


#: The arrays a lean layout's ceiling moves beside p and g, in ``lean.NAMES``' order, and their storage.
_LEAN_CEILING_ARRAYS = {
    "int8": (("mq", np.uint8), ("ma", np.float32), ("vq", np.uint8), ("va", np.float32)),
    "bfloat16": (("m", np.uint16), ("v", np.uint16)),
}


class LeanCeiling(Ceiling):
    """The same-bytes kernel of a lean state layout (see (a)): float32 p and g beside the moments as
    the layout stores them (int8: codes and one absmax per block; bfloat16: 16-bit patterns)."""

    def __init__(self, backend: str, kind: str) -> None:
        super().__init__(backend)
        self.state_dtype = kind
        self.name = f"ceiling {backend} {kind} state (same bytes, no math)"

    def unavailable(self, problem: Problem) -> str | None:
        # the ceiling of a layout runs where our step with that layout runs: the optimizer decides
        return lean_unavailable(problem, self.state_dtype) or lean_refusal(self.backend, self.state_dtype)

    def bytes_per_step(self, problem: Problem) -> int:
        return lean_bytes_per_step(self.state_dtype, problem.sizes)

    def setup(self, problem: Problem, sets: int) -> Case:
        return _LeanCeilingCase(self.backend, problem, sets, self.state_dtype)

    def initial(self, problem: Problem, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {name: x[idx].astype(np.float64) for name, x in _lean_ceiling_start(problem, self.state_dtype).items()}

    def expected_step(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                      t: int) -> dict[str, np.ndarray]:
        stored = {name: before[name].astype(dtype) for name, dtype in _LEAN_CEILING_ARRAYS[self.state_dtype]}
        out = {"p": before["p"].astype(np.float32) + g.astype(np.float32)}
        if self.state_dtype == "int8":
            out.update(mq=stored["vq"], vq=stored["mq"] + stored["vq"], ma=stored["va"], va=stored["ma"] + stored["va"])
        else:
            out.update(m=stored["v"], v=stored["m"] + stored["v"])
        return {k: x.astype(np.float64) for k, x in out.items()}


def _per_element(name: str, x: np.ndarray, n: int) -> np.ndarray:
    """An absmax (one per block) as one value per element, so verification samples it by element."""
    return np.repeat(x, BLOCK)[:n] if name in ("ma", "va") else x


def _lean_ceiling_start(problem: Problem, kind: str) -> dict[str, np.ndarray]:
    """p0 and random moments in their storage (per element: an absmax repeated over its block)."""
    rng = np.random.default_rng(1)
    n = problem.n
    out = {"p": problem.p0}
    for name, dtype in _LEAN_CEILING_ARRAYS[kind]:
        if dtype == np.float32:
            x = rng.random(lean.n_blocks(n), dtype=np.float32)
        else:
            x = rng.integers(0, np.iinfo(dtype).max + 1, n).astype(dtype)
        out[name] = _per_element(name, x, n)
    return out


class _LeanCeilingCase(BackendCase):
    def __init__(self, backend: str, problem: Problem, sets: int, kind: str) -> None:
        super().__init__(backend, problem, sets)
        self.kernel = ceiling_kernel(backend, lean.KERNEL[kind])
        start = _lean_ceiling_start(problem, kind)
        self.names = [name for name, _ in _LEAN_CEILING_ARRAYS[kind]]
        # the stored arrays (an absmax: one per block) from the per-element start
        stored = {name: start[name][::BLOCK] if name in ("ma", "va") else start[name] for name in self.names}
        self.arrays = [{name: to_backend(self.be, stored[name]) for name in self.names} for _ in range(sets)]
        self.args = [(self.be.flat(params[0]), self.be.flat(grads[0]), *(arrays[name] for name in self.names))
                     for params, grads, arrays in zip(self.params, self.grads, self.arrays)]

    def step(self, k: int) -> None:
        self.kernel(*self.args[k])

    def state(self) -> dict[str, np.ndarray]:
        n = self.problem.n
        out = {"p": self._host(self.params[0])}
        for name in self.names:
            out[name] = _per_element(name, self.be.to_host(self.arrays[0][name]), n)
        return out
