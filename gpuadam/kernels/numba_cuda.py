"""Numba CUDA grid-stride kernels over the scalar rules.

Importing this module imports ``numba.cuda``, which raises on a machine without the CUDA runtime:
``gpuadam.backends`` imports it only when the backend is probed or used. The kernels are
compiled lazily, per dtype, at their first launch.
"""

import math

import numpy as np
from numba import cuda, float32, float64, uint64

from gpuadam.kernels import rules
from gpuadam.kernels.lowp import load_half, store_half, store_param
from gpuadam.kernels.rules import N_CONSTANTS, SKIP, adam_rule, amsgrad_rule, grad_factor, load_constants

# Unsigned 64-bit indices on purpose: a signed induction variable lets LLVM prove the trip count
# and unroll the loop 4x, which holds four elements' loads in flight and pushes the float32 kernel
# past 32 registers (below full occupancy); the unsigned loop compiles to one lean body.


def adam_kernel(p, g, m, v, c):
    c = load_constants(c)  # a tuple argument, or a device array written by prepare_kernel
    if c[SKIP] != 0:
        return
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i] = adam_rule(p[i], g[i], m[i], v[i], c)
        i += stride


def amsgrad_kernel(p, g, m, v, vmax, c):
    c = load_constants(c)
    if c[SKIP] != 0:
        return
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i], vmax[i] = amsgrad_rule(p[i], g[i], m[i], v[i], vmax[i], c)
        i += stride


def _make_sumsq(scalar, fmt):
    def sumsq_kernel(g, red):
        """Adds the sum of squares of ``g`` to ``red[0]`` and its count of inf/NaN to ``red[1]``.

        Each thread sums in the gradients' precision; the block sums in float64 and adds once.
        Non-finite values stay in the sum (the norm is then inf/NaN, as PyTorch's would be).
        """
        partial = cuda.shared.array(THREADS, float64)
        bad = cuda.shared.array(THREADS, float64)
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        n = uint64(g.size)
        acc = scalar(0)
        count = 0
        while i < n:
            x = g[i] if fmt < 0 else load_half(g[i], fmt)
            acc += x * x
            if not math.isfinite(x):
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
            cuda.atomic.add(red, 0, partial[0])
            cuda.atomic.add(red, 1, bad[0])

    return sumsq_kernel


def _make_prepare(constants_fn):
    def prepare_kernel(red, hyper, inv_scale, max_norm, skip_nonfinite, lr, steps, group,
                       consts32, consts64, norm, skipped, last, host_step):
        """One thread: the norm, clip factor and skip decision, then this group's step count and
        constants, all on the device. ``lr[group] >= 0`` overrides the host's lr (capturable);
        ``host_step > 0`` is the step number when the host keeps the count."""
        if cuda.grid(1) != 0:
            return
        out_norm, grad_mul, skip = grad_factor(red[0], red[1], inv_scale, max_norm, skip_nonfinite)
        if last != 0:
            norm[0] = out_norm
            red[0] = 0.0  # ready for the next step's sums
            red[1] = 0.0
        if skip != 0.0:
            consts32[SKIP] = 1.0
            consts64[SKIP] = 1.0
            if last != 0:
                skipped[0] += 1
            return
        if host_step > 0:
            steps[group] = host_step
        else:
            steps[group] += 1
        h = hyper
        if lr[group] >= 0.0:
            h = (lr[group],) + hyper[1:]
        c = constants_fn(float64(steps[group]), h, grad_mul)
        for k in range(N_CONSTANTS):
            consts32[k] = c[k]
            consts64[k] = c[k]

    return prepare_kernel


#: Python kernels by name, with the number of array arguments: ``gpuadam inspect`` compiles these.
KERNELS = {"adam": (adam_kernel, 4), "amsgrad": (amsgrad_kernel, 5)}


# The rest of the family: ``device_kernel`` makes the loop of ``adam_kernel`` for any rule of
# ``rules.FAMILY_RULES``, so a new rule is one entry of that table.


def device_kernel(name, rule, n_state):
    """The grid-stride kernel ``(p, g, *state, c)`` of ``rule`` with ``n_state`` state arrays."""
    if n_state == 0:
        def kernel(p, g, c):
            c = load_constants(c)
            if c[SKIP] != 0:
                return
            i = uint64(cuda.grid(1))
            stride = uint64(cuda.gridsize(1))
            n = uint64(p.size)
            while i < n:
                p[i] = rule(p[i], g[i], c)
                i += stride
    elif n_state == 1:
        def kernel(p, g, s0, c):
            c = load_constants(c)
            if c[SKIP] != 0:
                return
            i = uint64(cuda.grid(1))
            stride = uint64(cuda.gridsize(1))
            n = uint64(p.size)
            while i < n:
                p[i], s0[i] = rule(p[i], g[i], s0[i], c)
                i += stride
    elif n_state == 2:
        def kernel(p, g, s0, s1, c):
            c = load_constants(c)
            if c[SKIP] != 0:
                return
            i = uint64(cuda.grid(1))
            stride = uint64(cuda.gridsize(1))
            n = uint64(p.size)
            while i < n:
                p[i], s0[i], s1[i] = rule(p[i], g[i], s0[i], s1[i], c)
                i += stride
    elif n_state == 3:
        def kernel(p, g, s0, s1, s2, c):
            c = load_constants(c)
            if c[SKIP] != 0:
                return
            i = uint64(cuda.grid(1))
            stride = uint64(cuda.gridsize(1))
            n = uint64(p.size)
            while i < n:
                p[i], s0[i], s1[i], s2[i] = rule(p[i], g[i], s0[i], s1[i], s2[i], c)
                i += stride
    else:
        raise ValueError(f"device_kernel: rules with 0 to 3 state arrays, got {n_state}")
    kernel.__name__ = kernel.__qualname__ = f"{name}_kernel"
    return kernel


KERNELS.update({name: (device_kernel(name, rule, n), n + 2) for name, (rule, n) in rules.FAMILY_RULES.items()})


# Half-precision storage (float16/bfloat16 as uint16 bits, ``lp = (fmt, stochastic, seed, step)``),
# float32 math. "master": float32 master weights and state, the half param rounded (to nearest
# even) from the master in the same pass. "half": half param and state, each rounded back (the
# param stochastically when asked).


def adam_master_kernel(p16, g16, w, m, v, c, lp):
    c = load_constants(c)
    if c[SKIP] != 0:
        return
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(w.size)
    while i < n:
        x, m[i], v[i] = adam_rule(w[i], load_half(g16[i], lp[0]), m[i], v[i], c)
        w[i] = x
        p16[i] = store_half(x, lp[0])
        i += stride


def amsgrad_master_kernel(p16, g16, w, m, v, vmax, c, lp):
    c = load_constants(c)
    if c[SKIP] != 0:
        return
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(w.size)
    while i < n:
        x, m[i], v[i], vmax[i] = amsgrad_rule(w[i], load_half(g16[i], lp[0]), m[i], v[i], vmax[i], c)
        w[i] = x
        p16[i] = store_half(x, lp[0])
        i += stride


def adam_half_kernel(p16, g16, m16, v16, c, lp):
    c = load_constants(c)
    if c[SKIP] != 0:
        return
    fmt = lp[0]
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p16.size)
    while i < n:
        p, m, v = adam_rule(load_half(p16[i], fmt), load_half(g16[i], fmt), load_half(m16[i], fmt),
                            load_half(v16[i], fmt), c)
        p16[i] = store_param(p, lp, i)
        m16[i] = store_half(m, fmt)
        v16[i] = store_half(v, fmt)
        i += stride


def amsgrad_half_kernel(p16, g16, m16, v16, vmax16, c, lp):
    c = load_constants(c)
    if c[SKIP] != 0:
        return
    fmt = lp[0]
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p16.size)
    while i < n:
        p, m, v, vmax = amsgrad_rule(load_half(p16[i], fmt), load_half(g16[i], fmt), load_half(m16[i], fmt),
                                     load_half(v16[i], fmt), load_half(vmax16[i], fmt), c)
        p16[i] = store_param(p, lp, i)
        m16[i] = store_half(m, fmt)
        v16[i] = store_half(v, fmt)
        vmax16[i] = store_half(vmax, fmt)
        i += stride


#: Half-precision kernels: name -> (kernel, array kinds: "h" half bits (uint16), "f" float32).
HALF_KERNELS = {
    "adam/master": (adam_master_kernel, "hhfff"),
    "amsgrad/master": (amsgrad_master_kernel, "hhffff"),
    "adam/half": (adam_half_kernel, "hhhh"),
    "amsgrad/half": (amsgrad_half_kernel, "hhhhh"),
}

THREADS = 256
BLOCKS_PER_SM = 8  # 8 x 256 threads fill an SM at <= 32 registers; more blocks only re-stride


_compiled: dict = {}
_max_blocks: list = []


def _launcher(name):
    kernel = _compiled.get(name)
    if kernel is None:
        kernel = _compiled[name] = cuda.jit((KERNELS.get(name) or HALF_KERNELS[name])[0])
    return kernel


def _cached(key, make):
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = cuda.jit(make())
    return kernel


def grad_sumsq(g, red, fmt=None) -> None:
    """Accumulate ``g``'s sum of squares and non-finite count into the device array ``red``
    (``g`` holds half-precision bits when ``fmt`` is given)."""
    scalar = float64 if g.dtype == np.float64 else float32
    half = -1 if fmt is None else fmt
    kernel = _cached(("sumsq", g.dtype.str, half), lambda: _make_sumsq(scalar, half))
    kernel[_blocks(g.size), THREADS](g, red)


def prepare(constants_fn, *args) -> None:
    """Launch the one-thread preparation of a group's constants (see ``_make_prepare``)."""
    _cached(("prepare", constants_fn), lambda: _make_prepare(constants_fn))[1, 1](*args)


def _blocks(n: int) -> int:
    if not _max_blocks:
        # The simulator's device has no multiprocessor count: let it run a few blocks.
        sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 2
        _max_blocks.append(sms * BLOCKS_PER_SM)
    return max(1, min(_max_blocks[0], (n + THREADS - 1) // THREADS))


def launch(name: str, arrays: tuple, c: tuple, *extra) -> None:
    """Launch kernel ``name`` on 1-D device arrays (Numba's) with constants ``c``, asynchronously."""
    n = arrays[0].size
    _launcher(name)[_blocks(n), THREADS](*arrays, c, *extra)
