"""Numba CPU loops over the scalar rules: ``prange`` for large arrays, a plain loop for small ones.

Waking the thread pool costs more than updating a few thousand elements, so arrays under
``PARALLEL_MIN`` elements take the serial loop. Both loops call the same rule.
"""

import numpy as np
from numba import njit, prange

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


def sumsq(g):
    """``(sum of squares, count of non-finite)`` of a 1-D host array, accumulated in float64."""
    return _sumsq(g)


def adam(p, g, m, v, c):
    """Adam on 1-D contiguous host arrays, in place."""
    (_adam_parallel if p.size >= PARALLEL_MIN else _adam_serial)(p, g, m, v, c)


def amsgrad(p, g, m, v, vmax, c):
    """Adam with AMSGrad on 1-D contiguous host arrays, in place."""
    (_amsgrad_parallel if p.size >= PARALLEL_MIN else _amsgrad_serial)(p, g, m, v, vmax, c)


#: Host kernels by rule name: ``fn(p, g, *state, c)`` on 1-D contiguous arrays, in place.
KERNELS = {"adam": adam, "amsgrad": amsgrad}
