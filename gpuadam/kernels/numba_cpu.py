"""Numba CPU loops over the scalar rules: ``prange`` for large arrays, a plain loop for small ones.

Every loop is made by ``host_kernel`` from ``rules.RULES``, so a new rule is one entry of that
table. Waking the thread pool costs more than updating a few hundred thousand elements (measured
by ``gpuadam bench``, BENCHMARKS.md), so arrays under ``PARALLEL_MIN`` elements take the serial
loop; both call the same rule. Numba caches each loop under the rule's name and a stamp of the
code it compiles in (see ``_named``).

``error_model="numpy"``: ``x / 0`` is inf or NaN, as in PyTorch and on the GPU, not a
ZeroDivisionError raised halfway through the loop; without that check the loop vectorizes.
"""

import hashlib
import types
from pathlib import Path

import numpy as np
from numba import njit, prange

from gpuadam.kernels import lowp, rules
from gpuadam.kernels.lowp import BFLOAT16, FLOAT16, load, load_half, store, store_rounded

PARALLEL_MIN = 1 << 18  # with OMP_WAIT_POLICY=PASSIVE a parallel launch costs ~50 us to wake the pool

# Numba's cache checks only the file that defines a function, not the functions it inlines: an
# edit of the rules or conversions kept running the old machine code (seen: a cached half loop
# ran the conversions of three commits before). Each cached name carries a stamp of their source.
_STAMP = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (rules, lowp))).hexdigest()[:10]


def _named(func, name):
    """A copy of ``func`` named ``name`` and the stamp: Numba names the cache files after it."""
    name = f"{name}_{_STAMP}"
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__qualname__ = name
    return copy


def _plain_loop(rule, n_state):
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
        raise ValueError(f"rules with 0 to 3 state arrays, got {n_state}")
    return loop


def _half_loop(rule, n_state, fmt, stochastic, master):
    # Half-precision storage (``lowp``): ``p`` is the half param, or (``master``) the float32
    # master with the half param in ``p16``; ``lp = (format, stochastic, seed, counter)``; the math
    # is float32. ``fmt``, ``stochastic`` and ``master`` are constants of the compiled loop, and the
    # param is stored here rather than by ``lowp.store_updated``: with the conversion chosen at
    # compile time and no array handed to a helper that stores, LLVM vectorizes the loop (bfloat16
    # half state ran 22x faster; handing the arrays to the store helper kept it scalar).

    if n_state == 0:
        def loop(p, g, c, lp, p16):
            lpc = (fmt, stochastic, lp[2], lp[3])
            for i in prange(p.size):
                x = rule(load(p, i, fmt), load(g, i, fmt), c)
                store_rounded(p, i, x, lpc)
                if master:
                    store(p16, i, x, fmt)
    elif n_state == 1:
        def loop(p, g, s0, c, lp, p16):
            lpc = (fmt, stochastic, lp[2], lp[3])
            for i in prange(p.size):
                x, a = rule(load(p, i, fmt), load(g, i, fmt), load(s0, i, fmt), c)
                store_rounded(p, i, x, lpc)
                if master:
                    store(p16, i, x, fmt)
                store(s0, i, a, fmt)
    elif n_state == 2:
        def loop(p, g, s0, s1, c, lp, p16):
            lpc = (fmt, stochastic, lp[2], lp[3])
            for i in prange(p.size):
                x, a, b = rule(load(p, i, fmt), load(g, i, fmt), load(s0, i, fmt), load(s1, i, fmt), c)
                store_rounded(p, i, x, lpc)
                if master:
                    store(p16, i, x, fmt)
                store(s0, i, a, fmt)
                store(s1, i, b, fmt)
    elif n_state == 3:
        def loop(p, g, s0, s1, s2, c, lp, p16):
            lpc = (fmt, stochastic, lp[2], lp[3])
            for i in prange(p.size):
                x, a, b, d = rule(load(p, i, fmt), load(g, i, fmt), load(s0, i, fmt), load(s1, i, fmt),
                                  load(s2, i, fmt), c)
                store_rounded(p, i, x, lpc)
                if master:
                    store(p16, i, x, fmt)
                store(s0, i, a, fmt)
                store(s1, i, b, fmt)
                store(s2, i, d, fmt)
    else:
        raise ValueError(f"rules with 0 to 3 state arrays, got {n_state}")
    return loop


def _compiled(name, loop):
    parallel = njit(parallel=True, cache=True, error_model="numpy")(_named(loop, f"_{name}_parallel"))
    serial = njit(cache=True, error_model="numpy")(_named(loop, f"_{name}_serial"))  # prange is range here
    return parallel, serial


def host_kernel(name, loop):
    """``fn(p, g, *state, c)`` running ``loop`` in place, in parallel from ``PARALLEL_MIN``."""
    parallel, serial = _compiled(name, loop)

    def run(p, g, *rest):
        (parallel if p.size >= PARALLEL_MIN else serial)(p, g, *rest)

    run.__name__ = run.__qualname__ = name.replace("/", "_")
    run.parallel, run.serial = parallel, serial
    return run


#: The half loops compiled: (format, stochastic rounding, master weights) -> name suffix.
#: Stochastic rounding is for bfloat16 without master weights only.
_HALF_VARIANTS = {
    (BFLOAT16, 0, False): "bf16", (BFLOAT16, 1, False): "bf16_sr", (FLOAT16, 0, False): "f16",
    (BFLOAT16, 0, True): "bf16_master", (FLOAT16, 0, True): "f16_master",
}


def half_kernel(name, rule, n_state):
    """``fn(p, g, *state, c, lp, p16)``: the loop compiled for ``lp``'s format and rounding, and
    for master weights when ``p`` is float32 (each compiled at its first call)."""
    variants = {key: _compiled(f"{name}_{suffix}", _half_loop(rule, n_state, *key))
                for key, suffix in _HALF_VARIANTS.items()}

    def run(p, g, *rest):
        lp = rest[-2]
        master = p.dtype != np.uint16
        stochastic = 1 if lp[1] and lp[0] == BFLOAT16 and not master else 0
        parallel, serial = variants[lp[0], stochastic, master]
        (parallel if p.size >= PARALLEL_MIN else serial)(p, g, *rest)

    run.__name__ = run.__qualname__ = name
    run.variants = variants
    return run


#: Host kernels by name: ``"adam"`` etc. take ``(p, g, *state, c)``; ``"adam/half"`` etc. take
#: ``(p, g, *state, c, lp, p16)`` on half-precision storage (see ``_half_loop``).
KERNELS = {}
for _name, (_rule, _n) in rules.RULES.items():
    KERNELS[_name] = host_kernel(_name, _plain_loop(_rule, _n))
    KERNELS[f"{_name}/half"] = half_kernel(f"{_name}_half", _rule, _n)


def _sumsq(g, fmt):
    total = 0.0
    bad = 0.0
    for i in prange(g.size):
        x = np.float64(load(g, i, fmt))
        total += x * x  # inf/NaN stay in: the norm is then inf/NaN, as PyTorch's would be
        if not np.isfinite(x):
            bad += 1.0
    return total, bad


_sumsq = njit(parallel=True, cache=True)(_named(_sumsq, "_sumsq"))


def sumsq(g, fmt=None):
    """``(sum of squares, count of non-finite)`` of a 1-D host array (half bits when ``fmt`` is
    given), accumulated in float64."""
    return _sumsq(g, -1 if fmt is None else fmt)


def _half_to_float32(h, fmt, out):
    for i in prange(h.size):
        out[i] = load_half(h[i], fmt)


_half_to_float32 = njit(parallel=True, cache=True)(_named(_half_to_float32, "_half_to_float32"))


def half_to_float32(h, fmt, out):
    """Widen half-precision bits to float32 (a master copy of half params)."""
    _half_to_float32(h, fmt, out)
