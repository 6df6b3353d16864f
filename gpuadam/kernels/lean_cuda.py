"""Numba CUDA kernels for lean state, per rule of ``lean_rules.RULES`` (Adam/AdamW, NAdam, RAdam):
8-bit blockwise (``lean_maps``), one thread block per quantisation block and one thread per
element; and bfloat16 moments, a grid-stride loop rounding as ``lean_cpu``'s (the same
``lowp.random32`` at index ``i``, halved between the two moments).

Each thread dequantises its element's moments, updates them and the param in float32 (the rule's
own element function), and offers the magnitudes' bits to the block's maxima, both moments
in one pass (``_block_max2``): compiled, each warp's by shuffles, then the eight warps' through shared
memory behind one barrier; in the simulator, which has no shuffles, a tree in shared memory (nine
barriers), so the simulator proves the kernel around it. After the block's new absmax is known each
thread writes its param and requantises (``lean_maps.nearest_code``, two table lookups from the
read-only maps); thread 0 writes the absmax. Every absmax is read before the first barrier and
written after the last.

With half params (master weights) the same kernels take the half gradient's bits, step the float32
master in ``p`` and write the half param rounded to nearest (``fmt``, ``half_param``); with float32
params ``half_param`` is None and Numba compiles that store out.

``backends.NumbaCUDA`` launches them by name (``LAUNCHERS``); proven in the
simulator (``tests/simulator/test_lean_sim.py``) and compiled for sm_90 (``gpuadam inspect``,
``machine_code.numba_lean_ptx``; ``tests/test_machine_code.py``); no GPU has run them.
"""

import numpy as np
from numba import config, cuda, float32, int32, int64, uint32, uint64

from gpuadam.kernels import lean_rules
from gpuadam.kernels.lean_maps import BLOCK, bf16_moments, inverse_scale, magnitude_bits, nearest_code
from gpuadam.kernels.lowp import bf16_to_f32, f32_from_bits, load, store_half
from gpuadam.kernels.numba_cuda import _renamed, opaque_index
from gpuadam.kernels.rules import RULES, SKIP, load_constants

#: Numba's CUDA simulator has no warp shuffles: there the block's maximum is a tree in shared memory
#: (``_tree_max2``), compiled it is ``_shuffle_max2``. The same maxima either way; chosen once, here.
SIMULATED = bool(config.ENABLE_CUDASIM)
WARP = 32
_FULL_MASK = 0xFFFFFFFF
#: Each moment's shared scratch: a slot per thread for the tree, per warp for the shuffles.
_SCRATCH = BLOCK if SIMULATED else BLOCK // WARP


@cuda.jit(device=True, inline=True)
def _tree_max2(m_bits, v_bits, scratch, t):
    """The thread block's maxima of ``m_bits`` and ``v_bits`` (int32), in every thread: both moments
    down one tree in ``scratch`` (``(2, BLOCK)``), eight halvings and nine barriers."""
    scratch[0, t] = m_bits
    scratch[1, t] = v_bits
    cuda.syncthreads()
    half = BLOCK // 2
    while half > 0:
        if t < half:
            scratch[0, t] = max(scratch[0, t], scratch[0, t + half])
            scratch[1, t] = max(scratch[1, t], scratch[1, t + half])
        cuda.syncthreads()
        half //= 2
    return scratch[0, 0], scratch[1, 0]


@cuda.jit(device=True, inline=True)
def _shuffle_max2(m_bits, v_bits, scratch, t):
    """The same maxima: each warp's by five butterfly shuffles (Numba has no ``redux.sync``), then the
    warps' through ``scratch`` (``(2, BLOCK // WARP)``) behind one barrier. One suffices because it
    runs once per launch block (one quantisation block): nothing rewrites the scratch. Every thread
    of the block must call it (full warp masks)."""
    lane = WARP // 2
    while lane > 0:
        m_bits = max(m_bits, cuda.shfl_xor_sync(_FULL_MASK, m_bits, lane))
        v_bits = max(v_bits, cuda.shfl_xor_sync(_FULL_MASK, v_bits, lane))
        lane //= 2
    if cuda.laneid == 0:
        warp = uint32(t) // uint32(WARP)  # unsigned: no signed division's fix-ups
        scratch[0, warp] = m_bits
        scratch[1, warp] = v_bits
    cuda.syncthreads()
    for w in range(BLOCK // WARP):
        m_bits = max(m_bits, scratch[0, w])
        v_bits = max(v_bits, scratch[1, w])
    return m_bits, v_bits


_block_max2 = _tree_max2 if SIMULATED else _shuffle_max2


def _int8_kernel(rule):
    @cuda.jit
    def int8_kernel(p, g, mq, m_absmax, vq, v_absmax, c, smap, sbuckets, sthr, umap, ubuckets, uthr, fmt, half_param):
        """Launch with ``p.size // BLOCK`` rounded up blocks of ``BLOCK`` threads. ``fmt``,
        ``half_param``: with half params, ``g`` holds half bits, ``p`` is the float32 master and
        ``half_param`` gets it rounded to nearest; else ``half_param`` is None (the branch is
        compiled out)."""
        cc = load_constants(c)
        if cc[SKIP] != 0:  # the same for every thread: nobody waits at a barrier alone
            return
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        i = b * BLOCK + t
        active = i < p.size
        zero = float32(0)
        m = zero
        v = zero
        x = zero
        if active:
            x, m, v = rule(p[i], load(g, i, fmt), smap[mq[i]] * m_absmax[b], umap[vq[i]] * v_absmax[b], cc)
        scratch = cuda.shared.array((2, _SCRATCH), int32)
        m_top, v_top = _block_max2(int32(magnitude_bits(m)), int32(magnitude_bits(v)), scratch, t)
        new_ma = f32_from_bits(np.uint32(m_top))
        new_va = f32_from_bits(np.uint32(v_top))
        if active:
            p[i] = x
            if half_param is not None:
                half_param[i] = store_half(x, fmt)
            mq[i] = nearest_code(m * inverse_scale(new_ma), sbuckets, sthr)
            vq[i] = nearest_code(v * inverse_scale(new_va), ubuckets, uthr)
        if t == 0:
            m_absmax[b] = new_ma
            v_absmax[b] = new_va

    return int8_kernel


def _bf16_kernel(rule, stochastic):
    # stochastic rounding or not is a constant of the compiled kernel: the nearest one carries no
    # hash; the loop and its stores are the plain kernels' (numba_cuda: unsigned index,
    # opaque_index), which keeps both within the 32 registers of full occupancy
    @cuda.jit
    def bf16_kernel(p, g, m, v, c, state_rounding, fmt, half_param):
        """float32 params (or masters: the int8 kernel's ``fmt``, ``half_param``), bfloat16 moments
        (uint16 bits); ``state_rounding = (stochastic, seed, counter)``."""
        cc = load_constants(c)
        if cc[SKIP] != 0:
            return
        seed = state_rounding[1]
        counter = state_rounding[2]
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        n = uint64(p.size)
        while i < n:
            x, mk, vk = rule(p[i], load(g, i, fmt), bf16_to_f32(m[i]), bf16_to_f32(v[i]), cc)
            j = opaque_index(i)  # the stores' addresses after the math, as numba_cuda's kernels
            p[j] = x
            if half_param is not None:
                half_param[j] = store_half(x, fmt)
            m[j], v[j] = bf16_moments(mk, vk, stochastic, seed, counter, int64(j))
            i += stride

    return bf16_kernel


#: The int8 kernels by rule (``lean_rules.RULES``), and the bfloat16-state ones by ``(rule,
#: stochastic)`` (``state_rounding[0]``), each named after both (PTX and profilers show which).
INT8 = {}
BF16 = {}
for _name in lean_rules.RULES:
    _element = RULES[_name].element
    INT8[_name] = _renamed(_int8_kernel(_element), f"{_name}_int8_kernel")
    for _s in (False, True):
        BF16[_name, _s] = _renamed(_bf16_kernel(_element, _s), f"{_name}_bf16state_{'sr' if _s else 'rn'}_kernel")


def launch(rule, p, g, mq, m_absmax, vq, v_absmax, c, maps, fmt=0, half_param=None, stream=0):
    """Run ``rule``'s int8 kernel over device arrays; ``maps`` are the six device tables
    (``lean_maps``: signed codes, buckets, thresholds, then the unsigned ones); ``fmt``,
    ``half_param``: half params with a float32 master ``p``."""
    blocks = (p.size + BLOCK - 1) // BLOCK
    INT8[rule][blocks, BLOCK, stream](p, g, mq, m_absmax, vq, v_absmax, c, *maps, int32(fmt), half_param)


_device_maps: list = []


def device_maps() -> list:
    """The six ``lean_maps`` tables on the device, copied once (``backends.NumbaCUDA.ready``, when
    an optimizer allocates lean state: never inside a step)."""
    if not _device_maps:
        from gpuadam.kernels import lean_maps

        _device_maps.extend(cuda.to_device(t) for t in (
            lean_maps.SIGNED, lean_maps.SIGNED_BUCKETS, lean_maps.SIGNED_THRESHOLDS,
            lean_maps.UNSIGNED, lean_maps.UNSIGNED_BUCKETS, lean_maps.UNSIGNED_THRESHOLDS))
    return _device_maps


def _launchers(rule):
    def launch_int8(arrays, c, rounding=None, half_param=None, stream=0):
        launch(rule, *arrays, c, device_maps(), 0 if rounding is None else rounding[0], half_param, stream=stream)

    def launch_bf16(arrays, c, state_rounding, rounding=None, half_param=None, stream=0):
        from gpuadam.kernels.numba_cuda import THREADS, _blocks

        fmt = int32(0 if rounding is None else rounding[0])
        kernel = BF16[rule, bool(state_rounding[0])]
        kernel[_blocks(arrays[0].size), THREADS, stream](*arrays, c, state_rounding, fmt, half_param)

    return {lean_rules.kernel(rule, "int8"): launch_int8, lean_rules.kernel(rule, "bfloat16"): launch_bf16}


#: The lean-state kernels by the names ``lean_rules.kernel`` gives them: ``(arrays, c, *extra,
#: stream=)``, ``extra`` ending, with half params, in the half kernels' ``rounding`` and the half param.
LAUNCHERS = {name: f for rule in lean_rules.RULES for name, f in _launchers(rule).items()}
