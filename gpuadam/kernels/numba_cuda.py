"""Numba CUDA grid-stride kernels over the scalar rules.

Every kernel is written for its rule's arity (``_plain_kernel``, ``_half_kernel``) from
``rules.RULES``, so a new rule needs nothing here. Importing this module imports ``numba.cuda``,
which raises on a machine without the CUDA runtime: ``gpuadam.backends`` imports it only when the
backend is probed or used. The kernels are compiled lazily, per signature, at their first launch.

Unsigned 64-bit indices on purpose: a signed induction variable lets LLVM prove the trip count and
unroll the loop, whose elements' loads in flight then cost registers past full occupancy; the
unsigned loop compiles to one lean body (figures: BENCHMARKS.md, "Why the kernels look as they do").

Each kernel starts with ``load_constants(c)``: ``c`` is a tuple argument, or a device array that
``prepare_kernel`` wrote (clipping, skipping, capturable), read once per thread.
"""

import math

import numpy as np
from llvmlite import ir
from numba import cuda, float32, float64, types, uint64
from numba.extending import intrinsic, overload

from gpuadam.kernels import rules
from gpuadam.kernels.arity import generated, state_names
from gpuadam.kernels.lowp import (
    load,
    store,  # noqa: F401 (the generated kernels call it)
    store_updated,  # noqa: F401 (the generated kernels call it)
)
from gpuadam.kernels.rules import (
    N_CONSTANTS,
    SKIP,
    grad_factor,
    load_constants,  # noqa: F401 (the generated kernels call it)
)


def opaque_index(i):
    """``i``, as a value the compiler cannot see through: the plain kernels store at it.

    Stored at ``i`` itself, each array's address is kept live from its load across the sqrt/div
    slow paths of the rule to its store: two registers per array, which with the constants read
    from a device array pushed the float32 kernels past full occupancy. Recomputed after the math,
    for a few integer instructions per element, every float32 kernel fits in 32 registers
    (``tests/test_machine_code.py``; figures: BENCHMARKS.md, "Why the kernels look as they do").
    The CuPy kernels do the same (``cupy_elementwise.INDEX_SOURCE``). In the simulator this runs
    as plain Python.
    """
    return i


@intrinsic
def _opaque_u64(typingctx, i):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        return builder.asm(fnty, "mov.b64 $0, $1;", "=l,l", args, side_effect=False)

    return types.uint64(types.uint64), codegen


@overload(opaque_index, target="cuda")
def _opaque_index(i):
    return lambda i: _opaque_u64(i)


def _plain_kernel(rule, n_state):
    state, new = state_names(n_state)
    stores = "".join(f"\n            {s}[j] = {a}" for s, a in zip(state, new))
    return generated(f"""
def make(rule):
    def kernel(p, g, {"".join(f"{s}, " for s in state)}c):
        c = load_constants(c)
        if c[SKIP] != 0:
            return
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        n = uint64(p.size)
        while i < n:
            {", ".join(["x", *new])} = rule(p[i], g[i], {"".join(f"{s}[i], " for s in state)}c)
            j = opaque_index(i)
            p[j] = x{stores}
            i += stride
    return kernel
""", globals(), __file__, rule)


def _half_kernel(rule, n_state):
    # Half-precision storage (``lowp``): ``p`` is the half param, or the float32 master with the
    # half param in ``half_param``; ``rounding = (format, stochastic, seed, counter, index_base)``; the math is
    # float32.
    state, new = state_names(n_state)
    loads = "".join(f"load({s}, i, fmt), " for s in state)
    stores = "".join(f"\n            store({s}, i, {a}, fmt)" for s, a in zip(state, new))
    return generated(f"""
def make(rule):
    def kernel(p, g, {"".join(f"{s}, " for s in state)}c, rounding, half_param):
        c = load_constants(c)
        if c[SKIP] != 0:
            return
        fmt = rounding[0]
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        n = uint64(p.size)
        while i < n:
            {", ".join(["x", *new])} = rule(load(p, i, fmt), load(g, i, fmt), {loads}c)
            store_updated(p, half_param, i, x, rounding){stores}
            i += stride
    return kernel
""", globals(), __file__, rule)


def _renamed(kernel, name):
    """``kernel`` itself, renamed in place (no copy, no stamp: CUDA kernels are not cached on disk),
    so PTX and profilers show which rule it runs."""
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


#: Python kernels by name, with their count of arrays (p, g and the state): ``"adam"`` etc. take
#: ``(p, g, *state, c)``, ``"adam/half"`` etc. ``(p, g, *state, c, rounding, half_param)``.
#: ``gpuadam inspect`` compiles every one.
KERNELS = {}
for _name, _rule in rules.RULES.items():
    KERNELS[_name] = (_renamed(_plain_kernel(_rule.element, _rule.n_state), f"{_name}_kernel"), _rule.n_state + 2)
    KERNELS[f"{_name}/half"] = (_renamed(_half_kernel(_rule.element, _rule.n_state), f"{_name}_half_kernel"),
                                _rule.n_state + 2)


def _make_sumsq(scalar, fmt, masked):
    def sumsq_kernel(g, sums, inv, valid):
        """Adds the sum of squares of ``g * inv`` to ``sums[0]`` and its count of inf/NaN to ``sums[1]``.

        ``g * inv`` is formed in the gradients' precision, as the update forms it: a gradient that
        overflows once unscaled counts as non-finite. Each thread sums in that precision; the block
        sums in float64 and adds once. Non-finite values stay in the sum (the norm is then inf/NaN,
        as PyTorch's would be). ``masked``: element ``i`` counts only when ``i % 16 < valid[i // 16]``
        (a FlatBuffer's padding never reaches the result).
        """
        partial = cuda.shared.array(THREADS, float64)
        bad = cuda.shared.array(THREADS, float64)
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        n = uint64(g.size)
        acc = scalar(0)
        count = 0
        while i < n:
            if not masked or (i & uint64(15)) < valid[i >> uint64(4)]:
                y = load(g, i, fmt) * inv
                acc += y * y
                if not math.isfinite(y):
                    count += 1
            i += stride
        t = cuda.threadIdx.x
        partial[t] = acc
        bad[t] = count
        cuda.syncthreads()
        half = THREADS // 2
        while half > 0:
            if t < half:
                partial[t] += partial[t + half]
                bad[t] += bad[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            cuda.atomic.add(sums, 0, partial[0])
            cuda.atomic.add(sums, 1, bad[0])

    return sumsq_kernel


def _make_prepare(constants_fn):
    def prepare_kernel(sums, hyper, inv_scale, max_norm, skip_nonfinite, lr, group, steps, slot,
                       consts32, consts64, norm, skipped, last, host_step):
        """One thread: the norm, clip factor and skip decision, then one slot's step count and
        constants (the params of ``group`` at that count), all on the device. ``lr[group] >= 0``
        overrides the host's lr (capturable); ``host_step > 0`` is the step number when the host
        keeps the count; ``last``: the step's last slot, which resets the sums."""
        if cuda.grid(1) != 0:
            return
        out_norm, grad_mul, skip = grad_factor(sums[0], sums[1], inv_scale, max_norm, skip_nonfinite)
        if last != 0:
            norm[0] = out_norm
            sums[0] = 0.0  # ready for the next step's sums
            sums[1] = 0.0
        if skip != 0.0:
            consts32[SKIP] = 1.0
            consts64[SKIP] = 1.0
            if last != 0:
                skipped[0] += 1
            return
        if host_step > 0:
            steps[slot] = host_step
        else:
            steps[slot] += 1
        h = hyper
        if lr[group] >= 0.0:
            h = (lr[group],) + hyper[1:]
        c = constants_fn(float64(steps[slot]), h, grad_mul)
        for k in range(N_CONSTANTS):
            consts32[k] = c[k]
            consts64[k] = c[k]

    return prepare_kernel


THREADS = 256
BLOCKS_PER_SM = 8  # 8 x 256 threads fill an SM at <= 32 registers; more blocks only re-stride


_compiled: dict = {}
_max_blocks: list = []


def _launcher(name):
    kernel = _compiled.get(name)
    if kernel is None:
        kernel = _compiled[name] = cuda.jit(KERNELS[name][0])
    return kernel


def _cached(key, make):
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = cuda.jit(make())
    return kernel


def grad_sumsq(g, sums, fmt=None, inv_scale=1.0, valid=None, stream=0) -> None:
    """Accumulate the sum of squares of ``g * inv_scale`` and its non-finite count into the device
    array ``sums`` (``g`` holds half-precision bits when ``fmt`` is given), on ``stream``; ``valid``
    (a device array of per-16-element counts) masks a FlatBuffer's padding."""
    scalar = float64 if g.dtype == np.float64 else float32
    half = -1 if fmt is None else fmt
    masked = valid is not None
    kernel = _cached(("sumsq", g.dtype.str, half, masked), lambda: _make_sumsq(scalar, half, masked))
    inv = np.float64(inv_scale) if scalar is float64 else np.float32(inv_scale)
    kernel[_blocks(g.size), THREADS, stream](g, sums, inv, valid if masked else sums)


def prepare(constants_fn, *args, stream=0) -> None:
    """Launch the one-thread preparation of a group's constants (see ``_make_prepare``) on ``stream``."""
    _cached(("prepare", constants_fn), lambda: _make_prepare(constants_fn))[1, 1, stream](*args)


def _blocks(n: int) -> int:
    if not _max_blocks:
        # The simulator's device has no multiprocessor count: let it run a few blocks.
        sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 2
        _max_blocks.append(sms * BLOCKS_PER_SM)
    return max(1, min(_max_blocks[0], (n + THREADS - 1) // THREADS))


def launch(name: str, arrays: tuple, c: tuple, *extra, stream=0) -> None:
    """Launch kernel ``name`` on 1-D device arrays (Numba's) with constants ``c``, asynchronously, on
    ``stream`` (a Numba stream; 0: Numba's default)."""
    n = arrays[0].size
    _launcher(name)[_blocks(n), THREADS, stream](*arrays, c, *extra)
