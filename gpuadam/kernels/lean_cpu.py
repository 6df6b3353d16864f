"""Numba CPU loops for Adam with lean state: 8-bit blockwise codes, or bfloat16 moments.

Both run Adam's own element functions (``rules.adam.adam_moments`` and ``adam_param``) in float32;
only the storage of ``exp_avg`` and ``exp_avg_sq`` differs, as in torchao.

``"adam/int8"`` takes ``(p, g, m_codes, m_absmax, v_codes, v_absmax, c)``: one iteration of the
parallel loop per quantisation block (``lean_maps.BLOCK`` elements of one tensor). The block is
read from memory once: a first sweep dequantises, updates the moments and takes their new absmax
(an integer maximum of the magnitudes' bits, which vectorises); the second sweep redoes the same
arithmetic on the lines now in L1, writes the param and requantises against the new absmax (each
code by ``lean_maps.nearest_code``, a branch-free search whose lookups are gathers). Recomputing
costs a few float operations per element; keeping the block's moments instead would need scratch
memory per thread. The params take the float32 moments before quantisation, as bitsandbytes'.

``"adam/bf16state"`` takes ``(p, g, m_bits, v_bits, c, state_rounding)`` with the moments as
bfloat16 bit patterns and ``state_rounding = (stochastic, seed, counter)``: stochastic rounding
draws its bits from ``lowp.random16`` at index ``2 i`` for ``exp_avg`` and ``2 i + 1`` for
``exp_avg_sq``.

With half params and master weights both take, last, the half kernels' ``rounding = (format,
stochastic, seed, counter)`` and the half param: ``p`` is then the float32 master, ``g`` the half
gradient's bits, and the half param is written rounded to nearest, as ``numba_cpu``'s master loops.
"""

import hashlib
from pathlib import Path

import numpy as np
from numba import prange

from gpuadam.kernels import lean_maps, lowp, numba_cpu, rules
from gpuadam.kernels.lean_maps import BLOCK, bf16_moments, inverse_scale, magnitude_bits, nearest_code
from gpuadam.kernels.lowp import bf16_to_f32, f32_from_bits, load, store
from gpuadam.kernels.numba_cpu import PARALLEL_MIN, run_parallel
from gpuadam.kernels.rules.adam import adam_moments, adam_param

_STAMP = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (*rules.SOURCES, lowp.__file__,
                                                                 lean_maps.__file__))).hexdigest()[:10]

# No half param to write (float32 params): an empty array, so one compiled loop serves both.
_NO_HALF = np.zeros(0, np.uint16)

# Elements per parallel chunk of the int8 loop: whole blocks, enough to amortise the scheduling.
BLOCKS_PER_CHUNK = 16


def adam_int8_loop(p, g, mq, m_absmax, vq, v_absmax, c, smap, sbuckets, sthr, umap, ubuckets, uthr, fmt,
                   half_param):
    n = p.size
    n_chunks = (n + BLOCK * BLOCKS_PER_CHUNK - 1) // (BLOCK * BLOCKS_PER_CHUNK)
    master = half_param.size != 0
    for chunk in prange(n_chunks):
        first = chunk * BLOCKS_PER_CHUNK
        last = min(first + BLOCKS_PER_CHUNK, (n + BLOCK - 1) // BLOCK)
        for b in range(first, last):
            start = b * BLOCK
            stop = min(n, start + BLOCK)
            ma = m_absmax[b]
            va = v_absmax[b]
            m_top = np.int64(0)
            v_top = np.int64(0)
            for i in range(start, stop):
                m, v = adam_moments(p[i], load(g, i, fmt), smap[mq[i]] * ma, umap[vq[i]] * va, c)
                m_top = max(m_top, magnitude_bits(m))
                v_top = max(v_top, magnitude_bits(v))
            new_ma = f32_from_bits(m_top)
            new_va = f32_from_bits(v_top)
            m_inv = inverse_scale(new_ma)
            v_inv = inverse_scale(new_va)
            for i in range(start, stop):
                m, v = adam_moments(p[i], load(g, i, fmt), smap[mq[i]] * ma, umap[vq[i]] * va, c)
                x = adam_param(p[i], m, v, c)
                p[i] = x
                if master:
                    store(half_param, i, x, fmt)
                mq[i] = nearest_code(m * m_inv, sbuckets, sthr)
                vq[i] = nearest_code(v * v_inv, ubuckets, uthr)
            m_absmax[b] = new_ma
            v_absmax[b] = new_va


def _bf16_loop(stochastic):
    def adam_bf16_loop(p, g, m, v, c, rounding, fmt, half_param):
        seed = rounding[1]
        counter = rounding[2]
        master = half_param.size != 0
        for i in prange(p.size):
            mk, vk = adam_moments(p[i], load(g, i, fmt), bf16_to_f32(m[i]), bf16_to_f32(v[i]), c)
            x = adam_param(p[i], mk, vk, c)
            p[i] = x
            if master:
                store(half_param, i, x, fmt)
            m[i], v[i] = bf16_moments(mk, vk, stochastic, seed, counter, i)
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
