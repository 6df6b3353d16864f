"""Numba CPU loops over the scalar rules: ``prange`` for large arrays, a plain loop for small ones.

Waking the thread pool costs more than updating a few thousand elements, so arrays under
``PARALLEL_MIN`` elements take the serial loop. Both loops call the same rule.
"""

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


def adam(p, g, m, v, c):
    """Adam on 1-D contiguous host arrays, in place."""
    (_adam_parallel if p.size >= PARALLEL_MIN else _adam_serial)(p, g, m, v, c)


def amsgrad(p, g, m, v, vmax, c):
    """Adam with AMSGrad on 1-D contiguous host arrays, in place."""
    (_amsgrad_parallel if p.size >= PARALLEL_MIN else _amsgrad_serial)(p, g, m, v, vmax, c)
