"""Numba CPU loops for Adam with lean state: 8-bit blockwise codes, or bfloat16 moments.

Both run Adam's own element functions (``rules.adam.adam_moments`` and ``adam_param``) in float32;
only the storage of ``exp_avg`` and ``exp_avg_sq`` differs, as in torchao.

``"adam/int8"`` takes ``(p, g, m_codes, m_absmax, v_codes, v_absmax, c)``: the parallel loop runs
over chunks of quantisation blocks (``lean_maps.BLOCK`` elements of one tensor), each chunk with a
block of float32 scratch per moment. Per block, four sweeps over slices (contiguous, so LLVM
vectorises them): dequantise each moment into the scratch (a scalar table lookup: x86 cores with
the gather data sampling fix make gathers slower than the loads they replace, and LLVM does not
emit them there); update the param and the moments in the scratch with Adam's functions, taking
the new absmax as an integer maximum of the magnitudes' bits; then requantise each moment
(``quantize_block``: ``lean_maps.estimate_code``, branch-free arithmetic, then ``nearest_code`` for
the few elements it marks). The block is read from memory once and written once. The params take
the float32 moments before quantisation, as bitsandbytes'.

``"adam/bf16state"`` takes ``(p, g, m_bits, v_bits, c, state_rounding)`` with the moments as
bfloat16 bit patterns and ``state_rounding = (stochastic, seed, counter)``: stochastic rounding
draws its bits from ``lowp.random32`` at index ``i``, the low 16 for ``exp_avg`` and the high 16
for ``exp_avg_sq`` (one hash per element).

With half params and master weights both take, last, the half kernels' ``rounding = (format,
stochastic, seed, counter)`` and the half param: ``p`` is then the float32 master, ``g`` the half
gradient's bits, and the half param is written rounded to nearest, as ``numba_cpu``'s master loops.
"""

import hashlib
from pathlib import Path

import numpy as np
from numba import prange
from numba.extending import register_jitable

from gpuadam.kernels import lean_maps, lowp, numba_cpu, rules
from gpuadam.kernels.lean_maps import (
    BLOCK,
    SIGNED_ESTIMATE,
    UNSIGNED_ESTIMATE,
    bf16_moments,
    estimate_code,
    inverse_scale,
    magnitude_bits,
    nearest_code,
)
from gpuadam.kernels.lowp import bf16_to_f32, f32_from_bits, load, store
from gpuadam.kernels.numba_cpu import PARALLEL_MIN, run_parallel
from gpuadam.kernels.rules.adam import adam_moments, adam_param

_STAMP = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (*rules.SOURCES, lowp.__file__,
                                                                 lean_maps.__file__))).hexdigest()[:10]

# No half param to write (float32 params): an empty array, so one compiled loop serves both.
_NO_HALF = np.zeros(0, np.uint16)

# Blocks per parallel chunk: enough to amortise the scheduling and the scratch.
BLOCKS_PER_CHUNK = 16


@register_jitable
def dequantize_block(q, cmap, absmax, out):
    """``out[j] = cmap[q[j]] * absmax``: one scalar lookup per element (no gathers, see above)."""
    for j in range(out.size):
        out[j] = cmap[q[j]] * absmax


@register_jitable
def update_block(p, g, m, v, c, fmt, half_param):
    """Adam on one block, the moments in and out of the float32 scratch ``m``, ``v``; returns the
    largest magnitudes' bits of the new moments (an integer maximum: it vectorises)."""
    m_top = np.int32(0)
    v_top = np.int32(0)
    for j in range(p.size):
        pj = p[j]
        mj, vj = adam_moments(pj, load(g, j, fmt), m[j], v[j], c)
        p[j] = adam_param(pj, mj, vj, c)
        m[j] = mj
        v[j] = vj
        m_top = max(m_top, np.int32(magnitude_bits(mj)))
        v_top = max(v_top, np.int32(magnitude_bits(vj)))
    if half_param.size != 0:  # a loop of its own: LLVM does not unswitch a branch in the one above
        for j in range(p.size):
            store(half_param, j, p[j], fmt)
    return m_top, v_top


@register_jitable
def quantize_block(x, absmax, estimate, buckets, thr, q, unsure):
    """The codes of ``x / absmax`` into ``q``: ``lean_maps.estimate_code`` for every element (a
    vector loop), then ``nearest_code`` for the few it marks ``unsure``."""
    inv = inverse_scale(absmax)
    rows, ties, zero = estimate
    for j in range(x.size):
        q[j], unsure[j] = estimate_code(x[j] * inv, rows, ties, zero)
    marked = np.uint8(0)
    for j in range(x.size):
        marked |= unsure[j]
    if marked:
        for j in range(x.size):
            if unsure[j]:
                q[j] = nearest_code(x[j] * inv, buckets, thr)


def adam_int8_loop(p, g, mq, m_absmax, vq, v_absmax, c, smap, sbuckets, sthr, umap, ubuckets, uthr, fmt,
                   half_param):
    n = p.size
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_chunks = (n_blocks + BLOCKS_PER_CHUNK - 1) // BLOCKS_PER_CHUNK
    master = half_param.size != 0
    for chunk in prange(n_chunks):
        m = np.empty(BLOCK, np.float32)
        v = np.empty(BLOCK, np.float32)
        unsure = np.empty(BLOCK, np.uint8)
        for b in range(chunk * BLOCKS_PER_CHUNK, min(n_blocks, (chunk + 1) * BLOCKS_PER_CHUNK)):
            # slices, so that each sweep is a loop over contiguous arrays that LLVM vectorises
            s = b * BLOCK
            e = min(n, s + BLOCK)
            w = e - s
            dequantize_block(mq[s:e], smap, m_absmax[b], m[:w])
            dequantize_block(vq[s:e], umap, v_absmax[b], v[:w])
            m_top, v_top = update_block(p[s:e], g[s:e], m[:w], v[:w], c, fmt,
                                        half_param[s:e] if master else half_param)
            m_absmax[b] = f32_from_bits(m_top)
            v_absmax[b] = f32_from_bits(v_top)
            quantize_block(m[:w], m_absmax[b], SIGNED_ESTIMATE, sbuckets, sthr, mq[s:e], unsure[:w])
            quantize_block(v[:w], v_absmax[b], UNSIGNED_ESTIMATE, ubuckets, uthr, vq[s:e], unsure[:w])


def _bf16_loop(stochastic):
    def adam_bf16_loop(p, g, m, v, c, rounding, fmt, half_param):
        seed = rounding[1]
        counter = rounding[2]
        for i in prange(p.size):
            mk, vk = adam_moments(p[i], load(g, i, fmt), bf16_to_f32(m[i]), bf16_to_f32(v[i]), c)
            p[i] = adam_param(p[i], mk, vk, c)
            m[i], v[i] = bf16_moments(mk, vk, stochastic, seed, counter, i)
        if half_param.size != 0:  # a loop of its own: LLVM does not unswitch a branch in the one above
            for i in prange(p.size):
                store(half_param, i, p[i], fmt)
    return adam_bf16_loop


def _compiled(name, loop):
    def stamped(func, suffix):
        return numba_cpu._stamped_copy(func, f"{name}{suffix}_{_STAMP}")
    from numba import njit
    parallel = njit(parallel=True, cache=True, nogil=True, error_model="numpy")(stamped(loop, "_parallel"))
    serial = njit(cache=True, nogil=True, error_model="numpy")(stamped(loop, "_serial"))
    return parallel, serial


def _int8_kernel():
    parallel, serial = _compiled("_adam_int8", adam_int8_loop)
    maps = (lean_maps.SIGNED, lean_maps.SIGNED_BUCKETS, lean_maps.SIGNED_THRESHOLDS,
            lean_maps.UNSIGNED, lean_maps.UNSIGNED_BUCKETS, lean_maps.UNSIGNED_THRESHOLDS)

    def run(p, g, mq, m_absmax, vq, v_absmax, c, rounding=None, half_param=_NO_HALF):
        fmt = 0 if rounding is None else rounding[0]
        if p.size >= PARALLEL_MIN:
            run_parallel(parallel, p, g, mq, m_absmax, vq, v_absmax, c, *maps, fmt, half_param)
        else:
            serial(p, g, mq, m_absmax, vq, v_absmax, c, *maps, fmt, half_param)

    run.parallel, run.serial = parallel, serial
    return run


def _bf16_kernel():
    variants = {s: _compiled(f"_adam_bf16state_{'sr' if s else 'rn'}", _bf16_loop(s)) for s in (False, True)}

    def run(p, g, m, v, c, state_rounding, rounding=None, half_param=_NO_HALF):
        parallel, serial = variants[bool(state_rounding[0])]
        fmt = 0 if rounding is None else rounding[0]
        if p.size >= PARALLEL_MIN:
            run_parallel(parallel, p, g, m, v, c, state_rounding, fmt, half_param)
        else:
            serial(p, g, m, v, c, state_rounding, fmt, half_param)

    run.variants = variants
    return run


#: The lean-state host kernels by name (the backend adds them to its table).
KERNELS = {"adam/int8": _int8_kernel(), "adam/bf16state": _bf16_kernel()}
