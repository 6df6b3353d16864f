"""Numba CPU loops over the scalar rules: ``prange`` for large arrays, a plain loop for small ones.

Waking the thread pool costs more than updating a few thousand elements, so arrays under
``PARALLEL_MIN`` elements take the serial loop. Both loops call the same rule.
"""

import types

import numpy as np
from numba import njit, prange

from gpuadam.kernels import rules
from gpuadam.kernels.lowp import load_half, store_half, store_param
from gpuadam.kernels.rules import adam_rule, amsgrad_rule

PARALLEL_MIN = 1 << 15


@njit(parallel=True, cache=True)
def _adam_parallel(p, g, m, v, c):
    for i in prange(p.size):
        p[i], m[i], v[i] = adam_rule(p[i], g[i], m[i], v[i], c)


@njit(cache=True)
def _adam_serial(p, g, m, v, c):
    for i in range(p.size):
        p[i], m[i], v[i] = adam_rule(p[i], g[i], m[i], v[i], c)


@njit(parallel=True, cache=True)
def _amsgrad_parallel(p, g, m, v, vmax, c):
    for i in prange(p.size):
        p[i], m[i], v[i], vmax[i] = amsgrad_rule(p[i], g[i], m[i], v[i], vmax[i], c)


@njit(cache=True)
def _amsgrad_serial(p, g, m, v, vmax, c):
    for i in range(p.size):
        p[i], m[i], v[i], vmax[i] = amsgrad_rule(p[i], g[i], m[i], v[i], vmax[i], c)


@njit(parallel=True, cache=True)
def _sumsq(g):
    total = 0.0
    bad = 0.0
    for i in prange(g.size):
        x = np.float64(g[i])
        total += x * x  # inf/NaN stay in: the norm is then inf/NaN, as PyTorch's would be
        if not np.isfinite(x):
            bad += 1.0
    return total, bad


@njit(parallel=True, cache=True)
def _sumsq_half(g16, fmt):
    total = 0.0
    bad = 0.0
    for i in prange(g16.size):
        x = np.float64(load_half(g16[i], fmt))
        total += x * x
        if not np.isfinite(x):
            bad += 1.0
    return total, bad


def sumsq(g, fmt=None):
    """``(sum of squares, count of non-finite)`` of a 1-D host array (half bits when ``fmt`` is
    given), accumulated in float64."""
    return _sumsq(g) if fmt is None else _sumsq_half(g, fmt)


def adam(p, g, m, v, c):
    """Adam on 1-D contiguous host arrays, in place."""
    (_adam_parallel if p.size >= PARALLEL_MIN else _adam_serial)(p, g, m, v, c)


def amsgrad(p, g, m, v, vmax, c):
    """Adam with AMSGrad on 1-D contiguous host arrays, in place."""
    (_amsgrad_parallel if p.size >= PARALLEL_MIN else _amsgrad_serial)(p, g, m, v, vmax, c)


# Half-precision storage (float16/bfloat16 as uint16 bits, ``lp = (fmt, stochastic, seed, step)``).
# "master": float32 master weights and state, the half param rounded (to nearest even) from the
# master in the same pass; "half": half param and state, float32 math, each rounded back (the
# param stochastically when asked).


@njit(parallel=True, cache=True)
def _adam_master(p16, g16, w, m, v, c, lp):
    for i in prange(w.size):
        w[i], m[i], v[i] = adam_rule(w[i], load_half(g16[i], lp[0]), m[i], v[i], c)
        p16[i] = store_half(w[i], lp[0])


@njit(parallel=True, cache=True)
def _amsgrad_master(p16, g16, w, m, v, vmax, c, lp):
    for i in prange(w.size):
        w[i], m[i], v[i], vmax[i] = amsgrad_rule(w[i], load_half(g16[i], lp[0]), m[i], v[i], vmax[i], c)
        p16[i] = store_half(w[i], lp[0])


@njit(parallel=True, cache=True)
def _adam_half(p16, g16, m16, v16, c, lp):
    fmt = lp[0]
    for i in prange(p16.size):
        p, m, v = adam_rule(load_half(p16[i], fmt), load_half(g16[i], fmt), load_half(m16[i], fmt),
                            load_half(v16[i], fmt), c)
        p16[i] = store_param(p, lp, i)
        m16[i] = store_half(m, fmt)
        v16[i] = store_half(v, fmt)


@njit(parallel=True, cache=True)
def _amsgrad_half(p16, g16, m16, v16, vmax16, c, lp):
    fmt = lp[0]
    for i in prange(p16.size):
        p, m, v, vmax = amsgrad_rule(load_half(p16[i], fmt), load_half(g16[i], fmt), load_half(m16[i], fmt),
                                     load_half(v16[i], fmt), load_half(vmax16[i], fmt), c)
        p16[i] = store_param(p, lp, i)
        m16[i] = store_half(m, fmt)
        v16[i] = store_half(v, fmt)
        vmax16[i] = store_half(vmax, fmt)


@njit(parallel=True, cache=True)
def half_to_float32(h, fmt, out):
    """Widen half-precision bits to float32 (a master copy of half params)."""
    for i in prange(h.size):
        out[i] = load_half(h[i], fmt)


#: Host kernels by rule name: ``fn(p, g, *state, c)`` on 1-D contiguous arrays, in place
#: (the half-precision ones take ``lp`` after ``c``).
KERNELS = {
    "adam": adam, "amsgrad": amsgrad,
    "adam/master": _adam_master, "amsgrad/master": _amsgrad_master,
    "adam/half": _adam_half, "amsgrad/half": _amsgrad_half,
}


# ---------------------------------------------------------------------------------------------
# The rest of the family: the same two loops, made by ``host_kernel`` for any rule, so a new rule
# is one entry of the table below. Numba caches each loop under the rule's name (its cache key
# holds the rule too), as it caches the loops above.


def _named(func, name):
    """A copy of ``func`` named ``name``: Numba names the cache files (and the symbols) after it."""
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__qualname__ = name
    return copy


def host_kernel(name, rule, n_state):
    """``fn(p, g, *state, c)``: ``rule`` over 1-D contiguous host arrays with ``n_state`` state
    arrays, in place; the ``prange`` loop from ``PARALLEL_MIN`` elements, the plain loop below."""
    if n_state == 0:
        def loop(p, g, c):
            for i in prange(p.size):
                p[i] = rule(p[i], g[i], c)
    elif n_state == 1:
        def loop(p, g, s0, c):
            for i in prange(p.size):
                p[i], s0[i] = rule(p[i], g[i], s0[i], c)
    elif n_state == 2:
        def loop(p, g, s0, s1, c):
            for i in prange(p.size):
                p[i], s0[i], s1[i] = rule(p[i], g[i], s0[i], s1[i], c)
    elif n_state == 3:
        def loop(p, g, s0, s1, s2, c):
            for i in prange(p.size):
                p[i], s0[i], s1[i], s2[i] = rule(p[i], g[i], s0[i], s1[i], s2[i], c)
    else:
        raise ValueError(f"host_kernel: rules with 0 to 3 state arrays, got {n_state}")
    # error_model="numpy": x / 0 is inf or NaN, as in PyTorch and on the GPU, not a ZeroDivisionError
    # raised halfway through the loop; without that check the loop vectorizes.
    parallel = njit(parallel=True, cache=True, error_model="numpy")(_named(loop, f"_{name}_parallel"))
    serial = njit(cache=True, error_model="numpy")(_named(loop, f"_{name}_serial"))  # prange is range here

    def run(p, g, *state_and_c):
        (parallel if p.size >= PARALLEL_MIN else serial)(p, g, *state_and_c)

    run.__name__ = run.__qualname__ = name
    run.parallel, run.serial = parallel, serial
    return run


KERNELS.update({name: host_kernel(name, rule, n) for name, (rule, n) in rules.FAMILY_RULES.items()})
