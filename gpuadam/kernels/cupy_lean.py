"""CUDA C of the lean-state kernels for CuPy ``RawKernel``s, per rule of ``lean_rules.RULES`` (Adam,
NAdam, RAdam), and their launchers: the int8 kernel (an ``ElementwiseKernel`` cannot reduce a
block's absmax), the same algorithm as ``lean_cuda``'s; and the bfloat16-state kernel, a grid-stride
loop rounding as ``lean_cpu``/``lean_cuda`` do (``lowp_random32`` at index ``i``: its low half for
``exp_avg``, its high half for ``exp_avg_sq`` when stochastic, else to nearest even).

The element work is plain functions, so the host tests run them with g++
(``tests/test_cupy_lean_host.py``): ``lean_int8_update`` dequantises and runs the rule's own snippet
(``Rule.snippet``, the rule's one C copy: ``lean_rule_snippet``), ``lean_int8_store`` writes the param and the
nearest codes (``lean_nearest_code``, the buckets and midpoints of ``lean_maps``); the int8
``__global__`` kernel, CUDA only, puts them around the block's maximum of the magnitudes' bits, both
moments in one pass (``lean_block_max2``): each warp's by ``__reduce_max_sync`` (shuffles before
sm_80), then the eight warps' through shared memory behind one barrier. The bfloat16 kernels' loop
is ordinary code: behind a one-thread shim of CUDA's built-ins the whole kernel runs on the host.
No float literal, no double.

Each kernel comes twice, as the ``ElementwiseKernel``s do: taking its constants as scalar arguments
by name (``constant_params(rule)``: the host computed them), or with ``_dc`` from a device array
(``on_device.DeviceSteps``: clipping, skipping, capturable). Either way the kernel gathers them into
a local array once, before any element (``gather_constants``). Stochastic rounding or not is a constant of
the compiled bfloat16 kernel (``_sr``/``_rn``), as in ``lean_cuda``. With half params each kernel has a
``_master`` twin: the gradient as half bits, ``p`` the float32 master, and last the half param (written
rounded to nearest) and its format.

``backends.CuPy`` launches them by name (``LAUNCHERS``, ``*_args`` build the argument tuples the
kernels declare); ``device_maps`` copies the six ``lean_maps`` tables to the device once, when an
optimizer allocates int8 state (``CuPy.ready``). Compiled for sm_90 by the tests; no GPU has run them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuadam.kernels.cupy_elementwise import INDEX_SOURCE, constant_params
from gpuadam.kernels.cupy_lowp import LOWP_SOURCE
from gpuadam.kernels.lean_maps import _HIGHEST, _LOWEST, BLOCK, N_BUCKETS
from gpuadam.kernels.lean_rules import RULES as LEAN_RULES
from gpuadam.kernels.lean_rules import kernel as lean_kernel
from gpuadam.kernels.rules import N_CONSTANTS, RULES, SKIP

#: Per rule of ``lean_rules.RULES``, the constants its snippet reads, ``(slot, name)``: the by-value
#: kernels' scalar parameters.
NAMED_CONSTANTS = {rule: constant_params(rule) for rule in LEAN_RULES}


def gather_constants(device_constants: bool, rule: str = "adam") -> str:
    """The kernel's first line: its constants in a local array ``cc`` in slot order (registers once
    the indices are constants), read once from ``c`` or taken from the named scalars."""
    named = dict(NAMED_CONSTANTS[rule])
    items = [f"c[{k}]" if device_constants else named.get(k, "lowp_f32_from_bits(0u)") for k in range(N_CONSTANTS)]
    return f"  const float cc[LEAN_N_CONSTANTS] = {{{', '.join(items)}}};\n"


def _constant_params(device_constants: bool, rule: str) -> str:
    return "const float* c" if device_constants else ", ".join(f"const float {n}" for _, n in NAMED_CONSTANTS[rule])


def _rule_source(rule: str) -> str:
    """The rule's element function on locals, in float32: its snippet (the rule's one C copy)."""
    unpack = "".join(f"  const T {name} = c[{k}];\n" for k, name in NAMED_CONSTANTS[rule])
    return f"""
/* {rule} on one element in float32: the new param p and moments m, v (the rule's snippet) */
GPUADAM_FN void lean_rule_snippet(T& p, const T g, T& m, T& v, const float* c) {{
{unpack}{RULES[rule].snippet}}}
"""


COMMON_SOURCE = LOWP_SOURCE + f"""
typedef float T;
enum {{ LEAN_BLOCK = {BLOCK}, LEAN_LOWEST = {_LOWEST}, LEAN_HIGHEST = {_HIGHEST}, LEAN_BUCKETS = {N_BUCKETS},
       LEAN_SKIP = {SKIP}, LEAN_N_CONSTANTS = {N_CONSTANTS} }};

/* the gradient in float32: as it is, or widened from half bits (half params) */
GPUADAM_FN float lean_grad(float g, int) {{ return g; }}
GPUADAM_FN float lean_grad(unsigned short h, int fmt) {{ return lowp_load_half(h, fmt); }}

/* the new param: into p, and with half params (p the float32 master) into the half param, rounded
   to nearest even */
GPUADAM_FN void lean_store_param(long long i, float x, float* p, unsigned short* half_param, int fmt) {{
  p[i] = x;
  if (half_param) half_param[i] = lowp_store_half(x, fmt);
}}
"""

# ---------------------------------------------------------------------------------------------
# int8: one block of LEAN_BLOCK threads per quantisation block


_INT8_ARRAYS = ("float* p, const float* g, unsigned char* mq, float* m_absmax, unsigned char* vq, "
                "float* v_absmax")
_INT8_MAPS = ("const float* smap, const unsigned char* sbuckets, const float* sthr, const float* umap, "
              "const unsigned char* ubuckets, const float* uthr, const long long n")


# With half params (``master``): ``p`` is the float32 master, ``g`` holds half bits, and the half
# param, last with its format, gets the new master rounded to nearest even.
_MASTER_TAIL = "unsigned short* half_param, const int fmt"


def _grad_type(master: bool) -> str:
    return "unsigned short" if master else "float"


def _master_args(master: bool) -> str:
    return "half_param, fmt" if master else "(unsigned short*)0, 0"


def int8_name(device_constants: bool, master: bool = False, rule: str = "adam") -> str:
    return f"gpuadam_{rule}_int8" + ("_master" if master else "") + ("_dc" if device_constants else "")


def int8_params(device_constants: bool, master: bool = False, rule: str = "adam") -> str:
    """The int8 kernel's C parameter list (``int8_args`` passes its arguments)."""
    arrays = _INT8_ARRAYS.replace("const float* g", f"const {_grad_type(master)}* g")
    tail = f", {_MASTER_TAIL}" if master else ""
    return f"{arrays}, {_constant_params(device_constants, rule)}, {_INT8_MAPS}{tail}"


def _int8_kernel(device_constants: bool, master: bool, rule: str) -> str:
    name, params = int8_name(device_constants, master, rule), int8_params(device_constants, master, rule)
    return f"""
extern "C" __global__ void {name}({params}) {{
{gather_constants(device_constants, rule)}  lean_int8_block(p, g, mq, m_absmax, vq, v_absmax, cc, smap, sbuckets, sthr,
                  umap, ubuckets, uthr, n, {_master_args(master)});
}}
"""


INT8_BODY = """
/* the code nearest x: the bucket's lowest code (top 16 bits of x), plus one above its midpoint */
GPUADAM_FN unsigned char lean_nearest_code(float x, const unsigned char* buckets, const float* thr) {
  const unsigned int b = lowp_f32_bits(x);
  const unsigned int lowest = LEAN_LOWEST, highest = LEAN_HIGHEST;
  unsigned int top = (b & 0x7FFFFFFFu) >> 16;
  top = top < lowest ? lowest : top > highest ? highest : top;
  const unsigned int base = buckets[top - LEAN_LOWEST + (b >> 31) * LEAN_BUCKETS];
  return (unsigned char)(base + (x > thr[base] ? 1u : 0u));
}

GPUADAM_FN unsigned int lean_magnitude_bits(float x) { return lowp_f32_bits(x) & 0x7FFFFFFFu; }

GPUADAM_FN float lean_inverse_scale(float absmax) {
  const float one = lowp_f32_from_bits(0x3F800000u);
  const float zero = lowp_f32_from_bits(0u);
  return absmax > zero ? one / absmax : zero;
}

/* element i of block b: the new param x and moments m, v in float32 */
template <typename G>
GPUADAM_FN void lean_int8_update(long long i, long long b, const float* p, const G* g,
    const unsigned char* mq, const float* m_absmax, const unsigned char* vq, const float* v_absmax,
    const float* c, const float* smap, const float* umap, int fmt, float& x, float& m, float& v) {
  x = p[i];
  m = smap[mq[i]] * m_absmax[b];
  v = umap[vq[i]] * v_absmax[b];
  lean_rule_snippet(x, lean_grad(g[i], fmt), m, v, c);
}

GPUADAM_FN void lean_int8_store(long long i, float x, float m, float v, float new_ma, float new_va,
    float* p, unsigned char* mq, unsigned char* vq, const unsigned char* sbuckets, const float* sthr,
    const unsigned char* ubuckets, const float* uthr, unsigned short* half_param, int fmt) {
  lean_store_param(i, x, p, half_param, fmt);
  mq[i] = lean_nearest_code(m * lean_inverse_scale(new_ma), sbuckets, sthr);
  vq[i] = lean_nearest_code(v * lean_inverse_scale(new_va), ubuckets, uthr);
}

#ifdef __CUDACC__
enum { LEAN_WARP = 32, LEAN_WARPS = LEAN_BLOCK / LEAN_WARP };
static_assert(LEAN_BLOCK % LEAN_WARP == 0, "a quantisation block is whole warps");

/* the warp's maximum, in every lane: redux.sync (one instruction) where the hardware has it, sm_80
   and later; five butterfly shuffles before (CuPy compiles for the device at hand) */
GPUADAM_FN unsigned int lean_warp_max(unsigned int bits) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xFFFFFFFFu, bits);
#else
  #pragma unroll
  for (int lane = LEAN_WARP / 2; lane > 0; lane /= 2) bits = max(bits, __shfl_xor_sync(0xFFFFFFFFu, bits, lane));
  return bits;
#endif
}

/* the thread block's maxima of m_bits and v_bits, in every thread (all of whom must call it: full
   warp masks): each warp's, then the warps' through shared memory behind one barrier. One suffices
   because it runs once per launch block (one quantisation block): nothing rewrites the array. */
GPUADAM_FN void lean_block_max2(unsigned int& m_bits, unsigned int& v_bits, unsigned int t) {
  __shared__ __align__(16) unsigned int warp_max[2][LEAN_WARPS];
  m_bits = lean_warp_max(m_bits);
  v_bits = lean_warp_max(v_bits);
  if (t % LEAN_WARP == 0) {
    warp_max[0][t / LEAN_WARP] = m_bits;
    warp_max[1][t / LEAN_WARP] = v_bits;
  }
  __syncthreads();
  #pragma unroll
  for (int w = 0; w < LEAN_WARPS; ++w) {
    m_bits = max(m_bits, warp_max[0][w]);
    v_bits = max(v_bits, warp_max[1][w]);
  }
}

template <typename G>
GPUADAM_FN void lean_int8_block(float* p, const G* g, unsigned char* mq, float* m_absmax,
    unsigned char* vq, float* v_absmax, const float* c, const float* smap, const unsigned char* sbuckets,
    const float* sthr, const float* umap, const unsigned char* ubuckets, const float* uthr, long long n,
    unsigned short* half_param, int fmt) {
  if (c[LEAN_SKIP]) return;  /* the same in every thread: a skipped step changes nothing */
  const long long b = blockIdx.x;
  const int t = threadIdx.x;
  const long long i = b * LEAN_BLOCK + t;
  float x = lowp_f32_from_bits(0u), m = x, v = x;
  if (i < n) lean_int8_update(i, b, p, g, mq, m_absmax, vq, v_absmax, c, smap, umap, fmt, x, m, v);
  unsigned int m_top = lean_magnitude_bits(m), v_top = lean_magnitude_bits(v);
  lean_block_max2(m_top, v_top, threadIdx.x);
  const float new_ma = lowp_f32_from_bits(m_top);
  const float new_va = lowp_f32_from_bits(v_top);
  if (i < n) lean_int8_store(i, x, m, v, new_ma, new_va, p, mq, vq, sbuckets, sthr, ubuckets, uthr, half_param,
                             fmt);
  if (t == 0) {
    m_absmax[b] = new_ma;
    v_absmax[b] = new_va;
  }
}
#endif
"""


# ---------------------------------------------------------------------------------------------
# bfloat16 state: a grid-stride loop, one element per trip


_BF16_ARRAYS = "float* p, const float* g, unsigned short* m, unsigned short* v"
_BF16_TAIL = "const unsigned int seed, const unsigned int counter, const long long n"


def bf16_name(stochastic: bool, device_constants: bool, master: bool = False, rule: str = "adam") -> str:
    return (f"gpuadam_{rule}_bf16state" + ("_sr" if stochastic else "_rn") + ("_master" if master else "")
            + ("_dc" if device_constants else ""))


def bf16_params(device_constants: bool, master: bool = False, rule: str = "adam") -> str:
    """The bfloat16-state kernels' C parameter list (``bf16_args`` passes its arguments); the seed
    and counter of stochastic rounding are ``lowp``'s 32-bit words (a nearest kernel ignores them)."""
    arrays = _BF16_ARRAYS.replace("const float* g", f"const {_grad_type(master)}* g")
    tail = f", {_MASTER_TAIL}" if master else ""
    return f"{arrays}, {_constant_params(device_constants, rule)}, {_BF16_TAIL}{tail}"


def _bf16_kernel(stochastic: bool, device_constants: bool, master: bool, rule: str) -> str:
    name = bf16_name(stochastic, device_constants, master, rule)
    params = bf16_params(device_constants, master, rule)
    return f"""
extern "C" __global__ void {name}({params}) {{
{gather_constants(device_constants, rule)}  lean_bf16_loop<{str(stochastic).lower()}>(p, g, m, v, cc, seed, counter, n,
      {_master_args(master)});
}}
"""


BF16_BODY = """
/* element i's new moments rounded to bfloat16 bits: stochastically (lowp_random32 at i, the index
   modulo 2**32 as lowp masks it: its low half for m, its high half for v) or to nearest even */
template <bool STOCHASTIC>
GPUADAM_FN void lean_bf16_store(long long i, float m, float v, unsigned short* m_bits, unsigned short* v_bits,
                                unsigned int seed, unsigned int counter) {
  if (STOCHASTIC) {
    const unsigned int bits = lowp_random32(seed, counter, static_cast<unsigned int>(i));
    m_bits[i] = lowp_f32_to_bf16_stochastic(m, bits & 0xFFFFu);
    v_bits[i] = lowp_f32_to_bf16_stochastic(v, bits >> 16);
  } else {
    m_bits[i] = lowp_f32_to_bf16(m);
    v_bits[i] = lowp_f32_to_bf16(v);
  }
}

template <bool STOCHASTIC, typename G>
GPUADAM_FN void lean_bf16_loop(float* p, const G* g, unsigned short* m_bits, unsigned short* v_bits,
                               const float* c, unsigned int seed, unsigned int counter, long long n,
                               unsigned short* half_param, int fmt) {
  if (c[LEAN_SKIP]) return;  /* a skipped step changes nothing */
  #pragma unroll 1
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    float x = p[i];
    float m = lowp_bf16_to_f32(m_bits[i]);
    float v = lowp_bf16_to_f32(v_bits[i]);
    lean_rule_snippet(x, lean_grad(g[i], fmt), m, v, c);
    const long long j = opaque_index(i);  /* the stores' addresses after the math: INDEX_SOURCE */
    lean_store_param(j, x, p, half_param, fmt);
    lean_bf16_store<STOCHASTIC>(j, m, v, m_bits, v_bits, seed, counter);
  }
}
"""


def int8_shared(rule: str = "adam") -> str:
    """The int8 kernels' C before their ``__global__`` function, ``rule``'s snippet within."""
    return COMMON_SOURCE + _rule_source(rule) + INT8_BODY


def bf16_shared(rule: str = "adam") -> str:
    """The bfloat16-state kernels' C before their ``__global__`` function, ``rule``'s snippet within."""
    return COMMON_SOURCE + INDEX_SOURCE + _rule_source(rule) + BF16_BODY


def int8_source(device_constants: bool, master: bool = False, rule: str = "adam") -> tuple[str, str]:
    """``(name, source)`` of an int8 kernel (one kernel per source: CuPy compiles each alone)."""
    kernel = _int8_kernel(device_constants, master, rule)
    return int8_name(device_constants, master, rule), int8_shared(rule) + "#ifdef __CUDACC__" + kernel + "#endif\n"


def bf16_source(stochastic: bool, device_constants: bool, master: bool = False, rule: str = "adam") -> tuple[str, str]:
    """``(name, source)`` of one bfloat16-state kernel."""
    return (bf16_name(stochastic, device_constants, master, rule),
            bf16_shared(rule) + _bf16_kernel(stochastic, device_constants, master, rule))


def kernel_source(kernel: str) -> tuple[str, str]:
    """``(name, source)`` of a lean kernel by its ``gpuadam inspect`` name: ``RULE/int8`` or
    ``RULE/bf16state`` (to nearest), ``RULE/bf16state/stochastic``, each also ``/master`` (half
    params), then each with ``/device-constants``; ``RULE`` one of ``lean_rules.RULES``."""
    base, _, variant = kernel.partition("/device-constants")
    if variant or base not in KERNELS:
        raise ValueError(f"unknown CuPy lean kernel {kernel!r}: expected one of {', '.join(KERNELS)}, "
                         "each optionally with /device-constants")
    return KERNELS[base](kernel.endswith("/device-constants"))


def _sources(rule: str) -> dict:
    return {
        f"{rule}/int8": lambda d: int8_source(d, rule=rule),
        f"{rule}/int8/master": lambda d: int8_source(d, master=True, rule=rule),
        f"{rule}/bf16state": lambda d: bf16_source(False, d, rule=rule),
        f"{rule}/bf16state/master": lambda d: bf16_source(False, d, master=True, rule=rule),
        f"{rule}/bf16state/stochastic": lambda d: bf16_source(True, d, rule=rule),
        f"{rule}/bf16state/stochastic/master": lambda d: bf16_source(True, d, master=True, rule=rule),
    }


#: The lean kernels by their ``gpuadam inspect`` names, each a function of ``device_constants``.
KERNELS = {name: source for rule in LEAN_RULES for name, source in _sources(rule).items()}


# ---------------------------------------------------------------------------------------------
# Launching (CuPy is imported only here, so the sources above need no GPU stack)


def _constants(c: Any, rule: str) -> tuple:
    """The constants as ``rule``'s kernel declares them: a device array of float32 (``_dc``), or the
    named float32 scalars."""
    if isinstance(c, tuple):
        return tuple(np.float32(c[k]) for k, _ in NAMED_CONSTANTS[rule])
    return (c,)


def _master_tail(rounding: tuple | None, half_param: Any) -> tuple:
    """With half params: the half param and its format (the first field of the half kernels' ``rounding``)."""
    return () if half_param is None else (half_param, np.int32(rounding[0]))


def int8_args(arrays: tuple, c: Any, maps: tuple, rounding: tuple | None = None, half_param: Any = None,
              rule: str = "adam") -> tuple:
    """``rule``'s int8 kernel's arguments: ``(p, g, m_codes, m_absmax, v_codes, v_absmax)``, the
    constants, the six ``lean_maps`` tables (``device_maps``) and the element count, typed as
    declared; with half params, then the half param and its format."""
    return (*arrays, *_constants(c, rule), *maps, np.int64(arrays[0].size), *_master_tail(rounding, half_param))


def bf16_args(arrays: tuple, c: Any, state_rounding: tuple, rounding: tuple | None = None,
              half_param: Any = None, rule: str = "adam") -> tuple:
    """The bfloat16-state kernel's arguments: ``(p, g, m_bits, v_bits)``, the constants, the seed and
    counter of ``state_rounding = (stochastic, seed, counter)`` as 32-bit words, the element count;
    with half params, then the half param and its format."""
    _, seed, counter = state_rounding
    return (*arrays, *_constants(c, rule), np.uint32(seed & 0xFFFFFFFF), np.uint32(counter & 0xFFFFFFFF),
            np.int64(arrays[0].size), *_master_tail(rounding, half_param))


_kernels: dict = {}
_device_maps: dict[int, tuple] = {}


def _kernel(kernel: str, device_constants: bool) -> Any:
    key = (kernel, device_constants)
    raw = _kernels.get(key)
    if raw is None:
        import cupy

        name, source = KERNELS[kernel](device_constants)
        raw = _kernels[key] = cupy.RawKernel(source, name)
    return raw


def device_maps() -> tuple:
    """The six ``lean_maps`` tables as CuPy arrays on the current device, copied once per device
    (``backends.CuPy.ready``, when an optimizer allocates int8 state: never inside a step)."""
    import cupy

    device = cupy.cuda.runtime.getDevice()
    maps = _device_maps.get(device)
    if maps is None:
        from gpuadam.kernels import lean_maps

        maps = _device_maps[device] = tuple(cupy.asarray(t) for t in (
            lean_maps.SIGNED, lean_maps.SIGNED_BUCKETS, lean_maps.SIGNED_THRESHOLDS,
            lean_maps.UNSIGNED, lean_maps.UNSIGNED_BUCKETS, lean_maps.UNSIGNED_THRESHOLDS))
    return maps


def _launchers(rule: str) -> dict:
    def launch_int8(arrays: tuple, c: Any, rounding: tuple | None = None, half_param: Any = None) -> None:
        name = f"{rule}/int8" + ("/master" if half_param is not None else "")
        kernel = _kernel(name, not isinstance(c, tuple))
        blocks = (arrays[0].size + BLOCK - 1) // BLOCK
        kernel((blocks,), (BLOCK,), int8_args(arrays, _device(c), device_maps(), rounding, half_param, rule))

    def launch_bf16(arrays: tuple, c: Any, state_rounding: tuple, rounding: tuple | None = None,
                    half_param: Any = None) -> None:
        from gpuadam.kernels.cupy_bookkeeping import THREADS, _blocks

        name = f"{rule}/bf16state" + ("/stochastic" if state_rounding[0] else "") + (
            "/master" if half_param is not None else "")
        kernel = _kernel(name, not isinstance(c, tuple))
        args = bf16_args(arrays, _device(c), state_rounding, rounding, half_param, rule)
        kernel((_blocks(arrays[0].size),), (THREADS,), args)

    return {lean_kernel(rule, "int8"): launch_int8, lean_kernel(rule, "bfloat16"): launch_bf16}


def _device(c: Any) -> Any:
    if isinstance(c, tuple):
        return c
    import cupy

    return cupy.asarray(c)  # any CUDA array of float32, zero-copy


#: The lean-state kernels by the names ``lean_rules.kernel`` gives them: ``(arrays, c, *extra)``,
#: launched on CuPy's current stream; with half params ``extra`` ends in the half kernels' ``rounding``
#: and the half param.
LAUNCHERS = {name: f for rule in LEAN_RULES for name, f in _launchers(rule).items()}
