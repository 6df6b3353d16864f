"""Blockwise 8-bit dynamic quantisation of optimizer state, compatible with bitsandbytes.

A state array is cut into blocks of ``BLOCK`` elements; each block keeps one float32 ``absmax``
(the largest magnitude in it) and one uint8 code per element, the index of the nearest value to
``x / absmax`` in a 256-entry map. ``exp_avg`` uses the signed dynamic map, ``exp_avg_sq`` the
unsigned one, both built as bitsandbytes' ``create_dynamic_map`` builds them: per decade
``10**-6 .. 10**0`` a linear grid of midpoints of ``linspace(0.1, 1, n + 1)`` (``n`` doubling per
decade), plus 0 and 1, sorted. The smallest nonzero magnitude is ``5.5e-7``.

Nearest code in two lookups: the code of ``x`` is how many of the 255 midpoints between
neighbouring codes (rounded down to float32: ``thresholds``) lie below ``x``. The top 16 bits of
``x`` (sign, exponent, 7 mantissa bits) pick a bucket of floats; across any bucket at most one
midpoint falls (the map's codes are decades times a linear grid, never closer than 2**-7 relative),
so a table holds each bucket's lowest code, and one comparison with the next midpoint finishes
(``nearest_code``). Both lookups are gathers with no dependent chain, so the loop over a block
vectorises (``tests/test_lean_maps.py`` reads the LLVM IR); an eight-step binary search over the
midpoints, with its dependent loads, ran about 4x slower. Where a gather costs more than the
scalar loads it replaces (BENCHMARKS.md, "Lean state"), the lookups still bound the loop.
Rounding a midpoint down keeps the answer exact: for a float32 ``x``, ``x > round_down(t)`` exactly
when ``x > t``, so the code is the argmin of the float64 distance, a tie going to the lower code.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from gpuadam.kernels.lowp import f32_bits, f32_to_bf16, f32_to_bf16_stochastic, random32

BLOCK = 256  #: elements per quantisation block (one absmax each)
MIN_SIZE = 4096  #: tensors with fewer elements keep float32 state (as bitsandbytes)
N_CODES = 256


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)``: a float32 step, the first half
    counted up from ``start``, the second down from ``end``, each value one fused multiply-add
    (rounded once: exact in float64, then to float32)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    out = np.empty(steps, np.float32)
    half = steps // 2
    for k in range(steps):
        wide = np.float64(start32) + step * k if k < half else np.float64(end32) - step * (steps - k - 1)
        out[k] = np.float32(wide)
    return out


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 float32 codes of bitsandbytes' ``create_dynamic_map(signed)`` (7 exponent bits), sorted."""
    data = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        bounds = _linspace32(0.1, 1.0, n + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        data += list(scale * means)
        if signed:
            data += list(-scale * means)
    data += [np.float32(0.0), np.float32(1.0)]
    assert len(data) == N_CODES
    return np.sort(np.array(data, np.float32))


def thresholds(codes: np.ndarray) -> np.ndarray:
    """The 255 midpoints between neighbouring codes (exact in float64), rounded down to float32."""
    c = codes.astype(np.float64)
    mid = (c[:-1] + c[1:]) / 2.0
    t = mid.astype(np.float32)
    over = t.astype(np.float64) > mid
    t[over] = np.nextafter(t[over], np.float32(-np.inf))
    return t


SIGNED = dynamic_map(True)
UNSIGNED = dynamic_map(False)


# Buckets: the top 16 bits of |x| between those of 2**-23 (below: all below the first midpoint
# away from 0) and of 1.0 (above: all above the last midpoint), then the same for negative x.
_LOWEST = 0x3400
_HIGHEST = 0x3F80
N_BUCKETS = _HIGHEST - _LOWEST + 1


def bucket_table(thr: np.ndarray) -> np.ndarray:
    """Per bucket of ``nearest_code``, the lowest code of its floats (uint8, ``2 * N_BUCKETS``).
    Raises if a bucket spans more than two codes (the one comparison would not decide)."""
    table = np.empty(2 * N_BUCKETS, np.uint8)
    for sign in (0, 1):
        for k in range(N_BUCKETS):
            top = _LOWEST + k
            low_bits = top << 16 if top > _LOWEST else 0
            high_bits = (top << 16) | 0xFFFF if top < _HIGHEST else 0x7F800000
            ends = (np.array([low_bits, high_bits], np.uint32) | np.uint32(sign << 31)).view(np.float32)
            first, last = sorted(int(c) for c in np.searchsorted(thr, ends, side="left"))
            if last - first > 1:
                raise ValueError(f"bucket {top:#x} (sign {sign}) spans codes {first}..{last}")
            table[sign * N_BUCKETS + k] = first
    return table


@register_jitable
def nearest_code(x, table, thr):
    """The index of the code nearest ``x`` (ties to the lower): the bucket's lowest code, plus one
    when ``x`` exceeds the midpoint above it. ``thr`` holds the 255 midpoints and ``+inf``."""
    b = f32_bits(x)
    top = min(max((b & 0x7FFFFFFF) >> 16, _LOWEST), _HIGHEST) - _LOWEST
    base = table[top + (b >> 31) * N_BUCKETS]
    return base + (x > thr[base])


@register_jitable
def magnitude_bits(x):
    """The IEEE bits of ``|x|``: ordered as the magnitudes are (a NaN above inf), so a block's absmax
    is an integer maximum, which vectorises where a float maximum (NaN-aware) does not."""
    return f32_bits(x) & 0x7FFFFFFF


@register_jitable
def inverse_scale(absmax):
    """``1 / absmax``, or 0 for an all-zero block (whose codes are then all the code of 0)."""
    one = np.float32(1)
    zero = np.float32(0)
    return one / absmax if absmax > zero else zero


SIGNED_THRESHOLDS = np.append(thresholds(SIGNED), np.float32(np.inf))
UNSIGNED_THRESHOLDS = np.append(thresholds(UNSIGNED), np.float32(np.inf))
SIGNED_BUCKETS = bucket_table(SIGNED_THRESHOLDS)
UNSIGNED_BUCKETS = bucket_table(UNSIGNED_THRESHOLDS)


# The host's nearest code, by arithmetic: where gathers are slow (x86 cores with the gather
# data sampling fix; LLVM does not emit them there) two table lookups per element cost more than
# the rest of the step, and a loop of them does not vectorise. The map is decades times a linear
# grid, so the code of ``y = |x|`` is: the number of decade boundaries below ``y`` (exact
# comparisons with the float32 midpoints), then the grid cell within the decade, ``y * inv_step +
# offset`` rounded up. The cell's estimate is trusted only away from the grid lines: within
# ``ESTIMATE_MARGIN`` of a grid step the element is marked for ``nearest_code``. The midpoints
# differ from the fitted grid by under 1e-5 of a step and float32 rounding of the estimate by
# under 5e-5, and ``tests/test_lean_maps.py`` checks every float32 in the range against
# ``nearest_code``. A negative ``x`` takes the mirrored code, whose tie goes the other way: ties
# are exactly on a threshold, so they are always marked (exact boundaries by ``ties``).
ESTIMATE_MARGIN = 1e-4


def estimate_tables(codes: np.ndarray) -> tuple[tuple, tuple, np.float32]:
    """The constants of ``estimate_code`` for a map, all float32: per decade boundary (in increasing
    order) ``(boundary, inv_step, offset, top)`` for the decade above it, such that the count of
    midpoints below ``y`` is ``min(ceil(y * inv_step + offset), top)`` (its grid lines fall on the
    integers; a decade with no midpoint inside has ``inv_step`` 0 and ``offset`` half below its
    count); the boundaries that are exact float32 values; and the code of 0."""
    c = codes.astype(np.float64)
    zero = int(np.searchsorted(codes, 0.0))
    pos = c[zero:]                                   # 0, the decades' codes, 1
    mids = (pos[:-1] + pos[1:]) / 2.0
    decade = np.floor(np.log10(pos[1:-1])).astype(int)
    starts = [1 + int(k) for k in np.flatnonzero(np.diff(decade, prepend=decade[0] - 1))]
    ends = starts[1:] + [len(pos) - 1]
    rows, ties = [], []
    for first, end in [*zip(starts, ends), (len(pos) - 1, None)]:
        boundary = mids[first - 1]
        bound32 = thresholds(np.array([pos[first - 1], pos[first]], np.float32))[0]
        if float(bound32) == boundary:
            ties.append(bound32)
        interior = mids[first:end - 1] if end is not None else mids[:0]
        inv_step, offset = 0.0, first - 0.5
        if interior.size:
            # the grid step: from the end midpoints, or the codes' spacing for a single midpoint
            if interior.size > 1:
                step = (interior[-1] - interior[0]) / (interior.size - 1)
            else:
                step = pos[first + 1] - pos[first]
            alpha = interior[0] - step
            inv_step = 1.0 / step
            off = np.abs((interior - alpha) * inv_step - np.arange(1, interior.size + 1)).max()
            if off > ESTIMATE_MARGIN / 10:
                raise ValueError(f"the midpoints above code {zero + first} are not a linear grid ({off:.2g} steps off)")
            offset = first - 1 - alpha * inv_step
        rows.append(tuple(np.float32(v) for v in (bound32, inv_step, offset, first + interior.size)))
    return tuple(rows), tuple(ties), np.float32(zero)


SIGNED_ESTIMATE = estimate_tables(SIGNED)
UNSIGNED_ESTIMATE = estimate_tables(UNSIGNED)


@register_jitable
def estimate_code(x, rows, ties, zero):
    """``(code, unsure)``: the code nearest ``x`` by arithmetic, and 1 where it must be found by
    ``nearest_code`` instead (near a midpoint, on an exact one, NaN or infinite). Branch-free, so a
    loop of it vectorises; every name here is float32 until the code."""
    y = abs(x)
    nil = np.float32(0)
    inv_step = top = nil
    offset = np.float32(-0.5)  # below the first boundary: no midpoint below, away from a grid line
    for row in rows:
        above = y > row[0]
        inv_step = row[1] if above else inv_step
        offset = row[2] if above else offset
        top = row[3] if above else top
    unsure = not y < np.float32(np.inf)  # NaN or inf
    for t in ties:
        unsure |= y == t
    u = y * inv_step + offset
    unsure |= abs(u - np.floor(u + np.float32(0.5))) < np.float32(ESTIMATE_MARGIN)
    count = min(np.ceil(u), top)
    code = zero - min(count, zero) if x < nil else zero + count
    return np.int32(code), np.int32(unsure)


def quantize(x: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: ``(codes uint8, absmax float32 per block)`` of a 1-D float32 array, nearest code."""
    x = np.asarray(x, np.float32)
    n_blocks = -(-x.size // BLOCK)
    padded = np.zeros(n_blocks * BLOCK, np.float32)
    padded[: x.size] = x
    blocks = padded.reshape(n_blocks, BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
    scaled = (blocks * inv[:, None]).reshape(-1)[: x.size]
    idx = np.searchsorted(thresholds(codes), scaled, side="left")
    return idx.astype(np.uint8), absmax


def dequantize(q: np.ndarray, absmax: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """NumPy: the float32 values of codes ``q`` with their blocks' ``absmax``."""
    scale = np.repeat(np.asarray(absmax, np.float32), BLOCK)[: q.size]
    return codes[q] * scale


@register_jitable
def bf16_moments(m, v, stochastic, seed, counter, i):
    """The bfloat16 bits of element ``i``'s new moments: rounded stochastically (``lowp.random32`` at
    index ``i``: its low 16 bits for ``exp_avg``, its high 16 for ``exp_avg_sq``) or to nearest
    even."""
    if stochastic:
        bits = random32(seed, counter, i)
        return f32_to_bf16_stochastic(m, bits & 0xFFFF), f32_to_bf16_stochastic(v, bits >> 16)
    return f32_to_bf16(m), f32_to_bf16(v)
