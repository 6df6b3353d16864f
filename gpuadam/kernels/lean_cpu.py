"""Numba CPU loops for lean state: 8-bit blockwise codes, or bfloat16 moments, for every rule of
``lean_rules.RULES`` (Adam/AdamW, NAdam, RAdam).

Both run the rule's own element function in float32; only the storage of ``exp_avg`` and
``exp_avg_sq`` differs, as in torchao.

``"adam/int8"`` (``"nadam/int8"``, ...) takes ``(p, g, m_codes, m_absmax, v_codes, v_absmax, c)``:
the parallel loop runs over chunks of quantisation blocks (``lean_maps.BLOCK`` elements of one
tensor), each chunk with a block of float32 scratch per moment. Per block, four sweeps over slices
(contiguous, so LLVM vectorises them): dequantise each moment into the scratch (a scalar table
lookup: x86 cores with the gather data sampling fix make gathers slower than the loads they
replace, and LLVM does not emit them there); update the param and the moments in the scratch with
the rule's function, taking the new absmax as an integer maximum of the magnitudes' bits; then
requantise each moment (``quantize_block``: ``lean_maps.estimate_code``, branch-free arithmetic,
then ``nearest_code`` for the few elements it marks). The block is read from memory once and
written once. The params take the float32 moments before quantisation, as bitsandbytes'.

``"adam/bf16state"`` (``"nadam/bf16state"``, ...) takes ``(p, g, m_bits, v_bits, c,
state_rounding)`` with the moments as bfloat16 bit patterns and ``state_rounding = (stochastic,
seed, counter)``: stochastic rounding draws its bits from ``lowp.random32`` at index ``i``, the low
16 for ``exp_avg`` and the high 16 for ``exp_avg_sq`` (one hash per element).

With half params and master weights both take, last, the half kernels' ``rounding = (format,
stochastic, seed, counter)`` and the half param: ``p`` is then the float32 master, ``g`` the half
gradient's bits, and the half param is written rounded to nearest, as ``numba_cpu``'s master loops.
"""

import hashlib
from pathlib import Path

import numpy as np
from numba import prange
from numba.extending import register_jitable

from gpuadam.kernels import lean_maps, lean_rules, lowp, numba_cpu, rules
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


def _int8_loop(rule):
    def int8_loop(p, g, mq, m_absmax, vq, v_absmax, c, smap, sbuckets, sthr, umap, ubuckets, uthr, fmt, half_param):
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
                mb = m[:w]
                vb = v[:w]
                dequantize_block(mq[s:e], smap, m_absmax[b], mb)
                dequantize_block(vq[s:e], umap, v_absmax[b], vb)
                # the update; the new absmax as an integer maximum of the magnitudes' bits (it vectorises)
                pb = p[s:e]
                gb = g[s:e]
                m_top = np.int32(0)
                v_top = np.int32(0)
                for j in range(w):
                    pb[j], mb[j], vb[j] = rule(pb[j], load(gb, j, fmt), mb[j], vb[j], c)
                    m_top = max(m_top, np.int32(magnitude_bits(mb[j])))
                    v_top = max(v_top, np.int32(magnitude_bits(vb[j])))
                if master:  # a loop of its own: LLVM does not unswitch a branch in the one above
                    hb = half_param[s:e]
                    for j in range(w):
                        store(hb, j, pb[j], fmt)
                m_absmax[b] = f32_from_bits(m_top)
                v_absmax[b] = f32_from_bits(v_top)
                quantize_block(mb, m_absmax[b], SIGNED_ESTIMATE, sbuckets, sthr, mq[s:e], unsure[:w])
                quantize_block(vb, v_absmax[b], UNSIGNED_ESTIMATE, ubuckets, uthr, vq[s:e], unsure[:w])
    return int8_loop


def _bf16_loop(rule, stochastic):
    def bf16_loop(p, g, m, v, c, rounding, fmt, half_param):
        seed = rounding[1]
        counter = rounding[2]
        for i in prange(p.size):
            p[i], mk, vk = rule(p[i], load(g, i, fmt), bf16_to_f32(m[i]), bf16_to_f32(v[i]), c)
            m[i], v[i] = bf16_moments(mk, vk, stochastic, seed, counter, i)
        if half_param.size != 0:  # a loop of its own: LLVM does not unswitch a branch in the one above
            for i in prange(p.size):
                store(half_param, i, p[i], fmt)
    return bf16_loop


def _compiled(name, loop):
    def stamped(func, suffix):
        return numba_cpu._stamped_copy(func, f"{name}{suffix}_{_STAMP}")
    from numba import njit
    parallel = njit(parallel=True, cache=True, nogil=True, error_model="numpy")(stamped(loop, "_parallel"))
    serial = njit(cache=True, nogil=True, error_model="numpy")(stamped(loop, "_serial"))
    return parallel, serial


def _int8_kernel(name):
    parallel, serial = _compiled(f"_{name}_int8", _int8_loop(rules.RULES[name].element))
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


def _bf16_kernel(name):
    element = rules.RULES[name].element
    variants = {s: _compiled(f"_{name}_bf16state_{'sr' if s else 'rn'}", _bf16_loop(element, s)) for s in (False, True)}

    def run(p, g, m, v, c, state_rounding, rounding=None, half_param=_NO_HALF):
        parallel, serial = variants[bool(state_rounding[0])]
        fmt = 0 if rounding is None else rounding[0]
        if p.size >= PARALLEL_MIN:
            run_parallel(parallel, p, g, m, v, c, state_rounding, fmt, half_param)
        else:
            serial(p, g, m, v, c, state_rounding, fmt, half_param)

    run.variants = variants
    return run


#: The lean-state host kernels by name (``lean_rules.kernel``: ``"adam/int8"``, ``"nadam/bf16state"``, ...),
#: one of each format per rule of ``lean_rules.RULES`` (the backend adds them to its table).
KERNELS = {}
for _name in lean_rules.RULES:
    KERNELS[lean_rules.kernel(_name, "int8")] = _int8_kernel(_name)
    KERNELS[lean_rules.kernel(_name, "bfloat16")] = _bf16_kernel(_name)
