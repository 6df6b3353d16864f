"""Numba CPU loops over the scalar rules: ``prange`` for large arrays, a plain loop for small ones.

Every loop is written for its rule's arity (``_plain_loop``, ``_half_loop``) from ``rules.RULES``,
so a new rule needs nothing here. Waking the thread pool costs more than updating a few hundred
thousand elements (measured by ``gpuadam bench``, BENCHMARKS.md), so arrays under ``PARALLEL_MIN``
elements take the serial loop; both call the same rule. Numba caches each loop under the rule's name and a stamp of the
code it compiles in (see ``_stamped_copy``).

``error_model="numpy"``: ``x / 0`` is inf or NaN, as in PyTorch and on the GPU, not a
ZeroDivisionError raised halfway through the loop; without that check the loop vectorizes.
"""

import hashlib
import threading
import types
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from gpuadam.kernels import lowp, rules
from gpuadam.kernels.arity import generated, state_names
from gpuadam.kernels.lowp import (
    BFLOAT16,
    FLOAT16,
    load,
    store,  # noqa: F401 (the generated loops call it)
    store_rounded,  # noqa: F401 (the generated loops call it)
)

PARALLEL_MIN = 1 << 18  # below it, waking the pool (OMP_WAIT_POLICY=PASSIVE) costs more than the loop

# Numba's cache checks only the file that defines a function, not the functions it inlines: an
# edit of the rules or conversions kept running the old machine code (seen: a cached half loop
# ran the conversions of three commits before). Each cached name carries a stamp of their source.
_STAMP = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (*rules.SOURCES, lowp.__file__))).hexdigest()[:10]


def _stamped_copy(func, name):
    """A new function object running ``func``'s code, named ``name`` plus the stamp: Numba names its
    cache files after it, so a changed rule or conversion is compiled afresh, not loaded."""
    name = f"{name}_{_STAMP}"
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__qualname__ = name
    return copy


def _plain_loop(rule, n_state):
    state, _ = state_names(n_state)
    outs = ", ".join(["p[i]", *(f"{s}[i]" for s in state)])
    return generated(f"""
def make(rule):
    def loop(p, g, {"".join(f"{s}, " for s in state)}c):
        for i in prange(p.size):
            {outs} = rule(p[i], g[i], {"".join(f"{s}[i], " for s in state)}c)
    return loop
""", globals(), __file__, rule)


def _half_loop(rule, n_state, fmt, stochastic, master):
    # Half-precision storage (``lowp``): ``p`` is the half param, or (``master``) the float32
    # master with the half param in ``half_param``; ``rounding = (format, stochastic, seed,
    # counter, index_base)``; the math is float32. ``fmt``, ``stochastic`` and ``master`` are constants of the
    # compiled loop, and the param is stored here rather than by ``lowp.store_updated``: with the
    # conversion chosen at compile time and no array handed to a helper that stores, LLVM vectorizes
    # the loop (handed to the store helper, the arrays kept it scalar; figures: BENCHMARKS.md).
    state, new = state_names(n_state)
    loads = "".join(f"load({s}, i, fmt), " for s in state)
    stores = "".join(f"\n            store({s}, i, {a}, fmt)" for s, a in zip(state, new))
    return generated(f"""
def make(rule, fmt, stochastic, master):
    def loop(p, g, {"".join(f"{s}, " for s in state)}c, rounding, half_param):
        static_rounding = (fmt, stochastic, rounding[2], rounding[3], rounding[4])  # fmt, stochastic: compile-time
        for i in prange(p.size):
            {", ".join(["x", *new])} = rule(load(p, i, fmt), load(g, i, fmt), {loads}c)
            store_rounded(p, i, x, static_rounding)
            if master:
                store(half_param, i, x, fmt){stores}
    return loop
""", globals(), __file__, rule, fmt, stochastic, master)


def _compiled(name, loop):
    # nogil: two optimizers stepped from two threads run side by side
    parallel = njit(parallel=True, cache=True, nogil=True, error_model="numpy")(
        _stamped_copy(loop, f"_{name}_parallel"))
    serial = njit(cache=True, nogil=True, error_model="numpy")(_stamped_copy(loop, f"_{name}_serial"))  # prange: range
    return parallel, serial


# Numba's fallback thread pool ("workqueue", where neither OpenMP nor TBB is found) aborts the
# process when two threads launch parallel loops at once: there, parallel loops take turns.
_POOL_LOCK = threading.Lock()


def run_parallel(fn, *args):
    """Call the ``parallel=True`` function ``fn``, one caller at a time under the workqueue pool."""
    if numba.config.THREADING_LAYER == "workqueue" or _threading_layer() == "workqueue":
        with _POOL_LOCK:
            return fn(*args)
    return fn(*args)


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet: the first call finds out, alone
        return "workqueue"


def host_kernel(name, loop):
    """``fn(p, g, *state, c)`` running ``loop`` in place, in parallel from ``PARALLEL_MIN``."""
    parallel, serial = _compiled(name, loop)

    def run(p, g, *rest):
        if p.size >= PARALLEL_MIN:
            run_parallel(parallel, p, g, *rest)
        else:
            serial(p, g, *rest)

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
    """``fn(p, g, *state, c, rounding, half_param)``: the loop compiled for ``rounding``'s format and
    stochastic rounding, and for master weights when ``p`` is float32 (each compiled at its first call)."""
    variants = {key: _compiled(f"{name}_{suffix}", _half_loop(rule, n_state, *key))
                for key, suffix in _HALF_VARIANTS.items()}

    def run(p, g, *rest):
        rounding = rest[-2]
        master = p.dtype != np.uint16
        stochastic = 1 if rounding[1] and rounding[0] == BFLOAT16 and not master else 0
        parallel, serial = variants[rounding[0], stochastic, master]
        if p.size >= PARALLEL_MIN:
            run_parallel(parallel, p, g, *rest)
        else:
            serial(p, g, *rest)

    run.__name__ = run.__qualname__ = name
    run.variants = variants
    return run


#: Host kernels by name: ``"adam"`` etc. take ``(p, g, *state, c)``; ``"adam/half"`` etc. take
#: ``(p, g, *state, c, rounding, half_param)`` on half-precision storage (see ``_half_loop``).
KERNELS = {}
for _name, _rule in rules.RULES.items():
    KERNELS[_name] = host_kernel(_name, _plain_loop(_rule.element, _rule.n_state))
    KERNELS[f"{_name}/half"] = half_kernel(f"{_name}_half", _rule.element, _rule.n_state)


#: Elements per block of the host reduction. Each block is summed in a fixed order (``LANES``
#: partial sums, each over its lane in index order) and the blocks' sums are added in block order:
#: the result is the same bits for any number of threads.
SUM_BLOCK = 1 << 14
LANES = 16  # a FlatBuffer granule (``flat.ALIGN``): ``valid`` holds one count per granule


def _make_sumsq(masked):
    def sumsq(g, fmt, inv, valid):
        n = g.size
        nblocks = (n + SUM_BLOCK - 1) // SUM_BLOCK
        sums = np.zeros(nblocks)
        bad = np.zeros(nblocks)
        for b in prange(nblocks):
            acc = np.zeros(LANES)
            nonfinite = np.zeros(LANES)
            start = b * SUM_BLOCK
            stop = min(n, start + SUM_BLOCK)
            whole = start + (stop - start) // LANES * LANES
            for k in range(start // LANES, whole // LANES):
                for lane in range(LANES):
                    # scaled in the gradient's precision, as the update scales it: an overflow
                    # there is a non-finite gradient (as GradScaler checks after unscaling)
                    y64 = np.float64(load(g, k * LANES + lane, fmt) * inv)
                    if masked and lane >= valid[k]:
                        y64 = 0.0  # padding, whatever it holds
                    acc[lane] += y64 * y64  # inf/NaN stay in: the norm is then inf/NaN, as PyTorch's
                    nonfinite[lane] += 0.0 if y64 - y64 == 0.0 else 1.0
            for i in range(whole, stop):
                lane = i - whole
                y64 = np.float64(load(g, i, fmt) * inv)
                if masked and lane >= valid[i // LANES]:
                    y64 = 0.0
                acc[lane] += y64 * y64
                nonfinite[lane] += 0.0 if y64 - y64 == 0.0 else 1.0
            total = 0.0
            count = 0.0
            for lane in range(LANES):
                total += acc[lane]
                count += nonfinite[lane]
            sums[b] = total
            bad[b] = count
        total = 0.0
        count = 0.0
        for b in range(nblocks):
            total += sums[b]
            count += bad[b]
        return total, count

    return sumsq


_sumsq = {masked: njit(parallel=True, cache=True, nogil=True)(_stamped_copy(_make_sumsq(masked), f"_sumsq_{masked:d}"))
          for masked in (False, True)}
_NO_MASK = np.zeros(0, np.uint8)


def sumsq(g, fmt=None, inv_scale=1.0, valid=None):
    """``(sum of squares, count of non-finite)`` of a 1-D host array times ``inv_scale`` (half bits
    when ``fmt`` is given), accumulated in float64, bitwise the same for any thread count.
    ``valid[k]``: how many elements of granule ``k`` (``LANES`` elements) count; the rest (a
    FlatBuffer's padding) are never read into the result."""
    inv = np.float64(inv_scale) if g.dtype == np.float64 else np.float32(inv_scale)
    masked = valid is not None
    return run_parallel(_sumsq[masked], g, -1 if fmt is None else fmt, inv, valid if masked else _NO_MASK)
