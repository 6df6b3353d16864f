"""float16/bfloat16 storage for the CuPy kernels: ``kernels.lowp`` written once more, in C.

``LOWP_SOURCE`` is the one C copy of ``lowp``'s conversions and hash, function for function (with
a ``lowp_`` prefix), proven bit for bit equal to it by ``tests/test_cupy_half_host.py``. It is the
preamble of the half-precision ``ElementwiseKernel``s (NVRTC, device code) and compiles with g++
for those host tests: the bit casts are CUDA's intrinsics on the device and ``memcpy`` on the host,
and the CUDA qualifiers are defined away there.

Integers are ``unsigned int``: ``lowp`` keeps its int64 values below 2**48 and masks them to 32
bits (``_mul32``), which is exactly C's unsigned wraparound. No float literal and no double: the
one float operation (a float16 subnormal's mantissa times 2**-24) takes the factor from its bits.
"""

from gpuadam.kernels.lowp import BFLOAT16, FLOAT16

#: The qualifier of every C helper function of the CuPy kernels, here and in ``cupy_elementwise``:
#: guarded, as a kernel's preamble may take in more than one source that needs it.
FN_SOURCE = r"""#ifndef GPUADAM_FN
#ifdef __CUDACC__
#define GPUADAM_FN static __device__ __forceinline__
#else
#define GPUADAM_FN static inline  /* g++: the host tests */
#endif
#endif
"""

LOWP_SOURCE = (
    "#ifndef GPUADAM_LOWP\n#define GPUADAM_LOWP\n"
    f"enum {{ LOWP_BFLOAT16 = {BFLOAT16}, LOWP_FLOAT16 = {FLOAT16} }};\n"
    + FN_SOURCE + r"""
GPUADAM_FN unsigned int lowp_f32_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  unsigned int b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
#endif
}

GPUADAM_FN float lowp_f32_from_bits(unsigned int b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
#endif
}

GPUADAM_FN float lowp_bf16_to_f32(unsigned short h) {
  return lowp_f32_from_bits(static_cast<unsigned int>(h) << 16);
}

GPUADAM_FN float lowp_f16_to_f32(unsigned short h) {
  const unsigned int sign = (h & 0x8000u) << 16;
  const unsigned int exp = (h >> 10) & 0x1Fu;
  const unsigned int mant = h & 0x3FFu;
  if (exp == 0x1Fu) {  /* inf, or a NaN made quiet with its payload kept */
    return lowp_f32_from_bits(sign | 0x7F800000u | (mant ? 0x400000u : 0u) | (mant << 13));
  }
  if (exp != 0u) return lowp_f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  /* zero or subnormal: mant * 2**-24 is exact and normal in float32 (so -ftz cannot touch it) */
  const float value = static_cast<float>(mant) * lowp_f32_from_bits(0x33800000u);
  return lowp_f32_from_bits(sign | lowp_f32_bits(value));
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
GPUADAM_FN unsigned short lowp_f32_to_bf16(float x) {
  const unsigned int b = lowp_f32_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((b >> 16) | 0x40u);
  return static_cast<unsigned short>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* Round to nearest even, with float16's subnormals, overflow to inf, and NaN kept. */
GPUADAM_FN unsigned short lowp_f32_to_f16(float x) {
  const unsigned int b = lowp_f32_bits(x);
  const unsigned int sign = (b >> 16) & 0x8000u;
  unsigned int a = b & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<unsigned short>(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
  if (a >= 0x477FF000u) return static_cast<unsigned short>(sign | 0x7C00u);  /* 65520 and above: inf */
  if (a >= 0x38800000u) {  /* normal in float16: rebias the exponent, round bit 13 to even */
    a = a + 0xFFFu + ((a >> 13) & 1u);
    return static_cast<unsigned short>(sign | ((a - 0x38000000u) >> 13));
  }
  if (a < 0x33000000u) return static_cast<unsigned short>(sign);  /* below 2**-25: zero */
  const unsigned int mant = (a & 0x7FFFFFu) | 0x800000u;
  const unsigned int shift = 126u - (a >> 23);
  unsigned int result = mant >> shift;
  const unsigned int rest = mant & ((1u << shift) - 1u);
  const unsigned int half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (result & 1u) != 0u)) result += 1u;
  return static_cast<unsigned short>(sign | result);
}

/* 32 random bits for element index at step: the lowbias32 hash of a mixed counter. */
GPUADAM_FN unsigned int lowp_random32(unsigned int seed, unsigned int step, unsigned int index) {
  unsigned int x = seed ^ (step * 0x9E3779B9u) ^ (index * 0x85EBCA6Bu);
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/* 16 random bits for element index at step: the low half of lowp_random32. */
GPUADAM_FN unsigned int lowp_random16(unsigned int seed, unsigned int step, unsigned int index) {
  return lowp_random32(seed, step, index) & 0xFFFFu;
}

/* Round down or up with probability in proportion to the distance: unbiased on average. */
GPUADAM_FN unsigned short lowp_f32_to_bf16_stochastic(float x, unsigned int bits16) {
  const unsigned int b = lowp_f32_bits(x);
  if ((b & 0x7FFFFFFFu) >= 0x7F800000u) return lowp_f32_to_bf16(x);
  return static_cast<unsigned short>((b + bits16) >> 16);
}

GPUADAM_FN float lowp_load_half(unsigned short h, int fmt) {
  return fmt == LOWP_FLOAT16 ? lowp_f16_to_f32(h) : lowp_bf16_to_f32(h);
}

GPUADAM_FN unsigned short lowp_store_half(float x, int fmt) {
  return fmt == LOWP_FLOAT16 ? lowp_f32_to_f16(x) : lowp_f32_to_bf16(x);
}

/* The updated parameter rounded to its storage, as lowp.store_param with rounding = (fmt, stochastic,
   seed, step); index is the element's index in the launched array, modulo 2**32. */
GPUADAM_FN unsigned short lowp_store_param(float x, int fmt, int stochastic, unsigned int seed, unsigned int step,
                                        unsigned int index) {
  if (stochastic != 0 && fmt == LOWP_BFLOAT16)
    return lowp_f32_to_bf16_stochastic(x, lowp_random16(seed, step, index));
  return lowp_store_half(x, fmt);
}
#endif
"""
)
