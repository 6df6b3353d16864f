"""CUDA C source of the int8-state Adam kernel, for a CuPy ``RawKernel`` (an ``ElementwiseKernel``
cannot reduce a block's absmax): the same algorithm as ``lean_cuda.adam_int8``.

The element work is two functions around the block's reduction, so the host tests can run them
with g++ around a serial reduction (``tests/test_cupy_lean_host.py``): ``lean_int8_update``
dequantises and runs Adam's own snippet (``rules.adam.ADAM.snippet``, the rule's one C copy), and
``lean_int8_store`` writes the param and the nearest codes (``lean_nearest_code``, the buckets and
midpoints of ``lean_maps``). The ``__global__`` kernel, CUDA only, puts them around a shared-memory
tree reduction of the magnitudes' bits. No float literal, no double.

Not yet launched by the cupy backend (``Optimizer`` refuses ``state_dtype`` off the host): compiled
for sm_90 by the tests; no GPU has run it.
"""

from gpuadam.kernels.cupy_elementwise import constant_params
from gpuadam.kernels.cupy_lowp import LOWP_SOURCE
from gpuadam.kernels.lean_maps import _HIGHEST, _LOWEST, BLOCK, N_BUCKETS
from gpuadam.kernels.rules import SKIP
from gpuadam.kernels.rules.adam import ADAM

NAME = "gpuadam_adam_int8"

_CONSTANTS = "".join(f"  const T {name} = c[{k}];\n" for k, name in constant_params("adam"))

INT8_SOURCE = LOWP_SOURCE + f"""
typedef float T;
enum {{ LEAN_BLOCK = {BLOCK}, LEAN_LOWEST = {_LOWEST}, LEAN_HIGHEST = {_HIGHEST}, LEAN_BUCKETS = {N_BUCKETS},
       LEAN_SKIP = {SKIP} }};

/* the code nearest x: the bucket's lowest code (top 16 bits of x), plus one above its midpoint */
GPUADAM_FN unsigned char lean_nearest_code(float x, const unsigned char* buckets, const float* thr) {{
  const unsigned int b = lowp_f32_bits(x);
  const unsigned int lowest = LEAN_LOWEST, highest = LEAN_HIGHEST;
  unsigned int top = (b & 0x7FFFFFFFu) >> 16;
  top = top < lowest ? lowest : top > highest ? highest : top;
  const unsigned int base = buckets[top - LEAN_LOWEST + (b >> 31) * LEAN_BUCKETS];
  return (unsigned char)(base + (x > thr[base] ? 1u : 0u));
}}

GPUADAM_FN unsigned int lean_magnitude_bits(float x) {{ return lowp_f32_bits(x) & 0x7FFFFFFFu; }}

GPUADAM_FN float lean_inverse_scale(float absmax) {{
  const float one = lowp_f32_from_bits(0x3F800000u);
  const float zero = lowp_f32_from_bits(0u);
  return absmax > zero ? one / absmax : zero;
}}

/* element i of block b: the new param x and moments m, v in float32 (Adam's snippet) */
GPUADAM_FN void lean_int8_snippet(T& p, const T g, T& m, T& v, const float* c) {{
{_CONSTANTS}{ADAM.snippet}}}

GPUADAM_FN void lean_int8_update(long long i, long long b, const float* p, const float* g,
    const unsigned char* mq, const float* m_absmax, const unsigned char* vq, const float* v_absmax,
    const float* c, const float* smap, const float* umap, float& x, float& m, float& v) {{
  x = p[i];
  m = smap[mq[i]] * m_absmax[b];
  v = umap[vq[i]] * v_absmax[b];
  lean_int8_snippet(x, g[i], m, v, c);
}}

GPUADAM_FN void lean_int8_store(long long i, float x, float m, float v, float new_ma, float new_va,
    float* p, unsigned char* mq, unsigned char* vq, const unsigned char* sbuckets, const float* sthr,
    const unsigned char* ubuckets, const float* uthr) {{
  p[i] = x;
  mq[i] = lean_nearest_code(m * lean_inverse_scale(new_ma), sbuckets, sthr);
  vq[i] = lean_nearest_code(v * lean_inverse_scale(new_va), ubuckets, uthr);
}}

#ifdef __CUDACC__
GPUADAM_FN unsigned int lean_block_max(unsigned int bits, unsigned int* scratch, int t) {{
  scratch[t] = bits;
  __syncthreads();
  for (int half = LEAN_BLOCK / 2; half > 0; half /= 2) {{
    if (t < half) scratch[t] = max(scratch[t], scratch[t + half]);
    __syncthreads();
  }}
  return scratch[0];
}}

/* one block of LEAN_BLOCK threads per quantisation block */
extern "C" __global__ void {NAME}(float* p, const float* g, unsigned char* mq, float* m_absmax,
    unsigned char* vq, float* v_absmax, const float* c, const float* smap, const unsigned char* sbuckets,
    const float* sthr, const float* umap, const unsigned char* ubuckets, const float* uthr, long long n) {{
  __shared__ unsigned int m_scratch[LEAN_BLOCK];
  __shared__ unsigned int v_scratch[LEAN_BLOCK];
  if (c[LEAN_SKIP]) return;  /* the same in every thread: a skipped step changes nothing */
  const long long b = blockIdx.x;
  const int t = threadIdx.x;
  const long long i = b * LEAN_BLOCK + t;
  float x = lowp_f32_from_bits(0u), m = x, v = x;
  if (i < n) lean_int8_update(i, b, p, g, mq, m_absmax, vq, v_absmax, c, smap, umap, x, m, v);
  const float new_ma = lowp_f32_from_bits(lean_block_max(lean_magnitude_bits(m), m_scratch, t));
  const float new_va = lowp_f32_from_bits(lean_block_max(lean_magnitude_bits(v), v_scratch, t));
  if (i < n) lean_int8_store(i, x, m, v, new_ma, new_va, p, mq, vq, sbuckets, sthr, ubuckets, uthr);
  if (t == 0) {{
    m_absmax[b] = new_ma;
    v_absmax[b] = new_va;
  }}
}}
#endif
"""
