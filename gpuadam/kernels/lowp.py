"""float16 and bfloat16 storage: conversions to and from float32, on raw 16-bit patterns.

Numba's CPU target has no float16 arithmetic and nobody's has bfloat16, so half-precision arrays
reach the kernels as uint16 bit patterns and these functions convert them, the same way on the
CPU, on the GPU and in the CUDA simulator (where they run as plain Python). Rounding to half
precision is to nearest even, or stochastic for bfloat16: the 16 random bits come from a
counter-based hash of (seed, step, element index), so every backend rounds every element alike.

Each conversion is written twice. The Python function is the specification and the simulator's
code: integer work on values below 2**48, so Python's integers give the bits of 32-bit machine
arithmetic; no float literal appears. Compiled code (Numba CPU and CUDA) gets an overload of the
same result in 16- and 32-bit IR, and converts float16 in hardware (see "Compiled code" below);
``tests/test_lowp.py`` checks the two agree bit for bit.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

BFLOAT16 = 0
FLOAT16 = 1


@intrinsic
def _bits_of(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float_of(typingctx, b):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


def f32_bits(x):
    """The IEEE bits of float32 ``x`` as an integer (compiled: a register move)."""
    return int(np.float32(x).view(np.uint32))


def f32_from_bits(b):
    """The float32 whose IEEE bits are ``b`` (compiled: a register move)."""
    return np.uint32(b).view(np.float32)


@overload(f32_bits)
def _f32_bits(x):
    return lambda x: np.int64(_bits_of(np.float32(x)))


@overload(f32_from_bits)
def _f32_from_bits(b):
    return lambda b: _float_of(np.uint32(b))


def bf16_to_f32(h):
    return f32_from_bits(np.int64(h) << 16)


def f16_to_f32(h):
    """float16 bits to float32, exactly; a NaN keeps its payload and is made quiet, as F16C does.

    The specification, and the simulator's code. Compiled code widens in hardware (F16C,
    ``cvt.f32.f16``) and sets the quiet bit, which a GPU's conversion need not:
    ``tests/test_lowp.py`` checks the two agree on all 65536 patterns.
    """
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0x1F:  # inf / nan
        return f32_from_bits(sign | 0x7F800000 | (0x400000 if mant != 0 else 0) | (mant << 13))
    if exp != 0:
        return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13))
    # zero or subnormal: mant * 2**-24, exact in float32
    return f32_from_bits(sign | f32_bits(np.float32(mant) * f32_from_bits(0x33800000)))


def f32_to_bf16(x):
    """Round to nearest even; NaN stays a (quiet) NaN."""
    b = f32_bits(x)
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return (b >> 16) | 0x40
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


def f32_to_f16(x):
    """Round to nearest even, with float16's subnormals, overflow to inf, and a NaN made the quiet
    NaN ``0x7E00`` with its sign.

    The specification, and the simulator's code. Compiled code narrows in hardware (F16C,
    ``cvt.rn.f16.f32``) and sets the NaNs' payload as here: ``tests/test_lowp.py`` checks the two.
    """
    b = f32_bits(x)
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a >= 0x7F800000:
        return sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0)
    if a >= 0x477FF000:  # 65520 and above round to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # normal in float16: rebias the exponent, round bit 13 to even
        a = a + 0xFFF + ((a >> 13) & 1)
        return sign | ((a - 0x38000000) >> 13)
    if a < 0x33000000:  # below 2**-25: rounds to zero
        return sign
    mant = (a & 0x7FFFFF) | 0x800000
    shift = 126 - (a >> 23)
    result = mant >> shift
    rest = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (result & 1) == 1):
        result += 1
    return sign | result


def _mul32(x, k):
    # (x * k) mod 2**32 with every intermediate below 2**48
    lo = x * (k & 0xFFFF)
    hi = ((x * (k >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Compiled code: the same results in 16- and 32-bit integer operations and the hardware's float16
# conversions (F16C on the host, ``cvt`` on the GPU). Numba widens integer arithmetic written in
# Python to 64 bits, which halves the lanes of a vectorized host loop (BENCHMARKS.md, "Why the
# kernels look as they do"); the functions above stay the specification, and the simulator's code.
# ``tests/test_lowp.py`` checks the two agree bit for bit.

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _i16(builder, v):
    width = v.type.width
    return v if width == 16 else builder.trunc(v, _I16) if width > 16 else builder.zext(v, _I16)


def _k(value):
    return ir.Constant(_I32, value)


@intrinsic
def _widen_bf16(typingctx, h):
    def codegen(context, builder, signature, args):
        b = builder.shl(builder.zext(_i16(builder, args[0]), _I32), _k(16))
        return builder.bitcast(b, ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _widen_f16(typingctx, h):
    def codegen(context, builder, signature, args):
        h16 = _i16(builder, args[0])
        wide = builder.fpext(builder.bitcast(h16, ir.HalfType()), ir.FloatType())
        # F16C already quiets a NaN keeping its payload; a GPU's cvt need not: set the quiet bit.
        quiet = builder.bitcast(builder.or_(builder.bitcast(wide, _I32), _k(0x400000)), ir.FloatType())
        return builder.select(builder.fcmp_unordered("uno", wide, wide), quiet, wide)

    return types.float32(h), codegen


def _bf16_nearest(builder, x):
    b = builder.bitcast(x, _I32)
    high = builder.lshr(b, _k(16))
    even = builder.lshr(builder.add(builder.add(b, _k(0x7FFF)), builder.and_(high, _k(1))), _k(16))
    return builder.select(builder.fcmp_unordered("uno", x, x), builder.or_(high, _k(0x40)), even)


@intrinsic
def _narrow_bf16(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.zext(_i16(builder, _bf16_nearest(builder, args[0])), _I64)

    return types.int64(types.float32), codegen


@intrinsic
def _narrow_bf16_stochastic(typingctx, x, bits16):
    # f32_to_bf16_stochastic in 32-bit lanes (the Python form's sum is 64-bit: half the lanes)
    def codegen(context, builder, signature, args):
        b = builder.bitcast(args[0], _I32)
        r = builder.trunc(args[1], _I32) if args[1].type.width > 32 else builder.zext(args[1], _I32)
        up = builder.lshr(builder.add(b, r), _k(16))
        finite = builder.icmp_unsigned("<", builder.and_(b, _k(0x7FFFFFFF)), _k(0x7F800000))
        return builder.zext(_i16(builder, builder.select(finite, up, _bf16_nearest(builder, args[0]))), _I64)

    return types.int64(types.float32, bits16), codegen


@intrinsic
def _narrow_f16(typingctx, x):
    def codegen(context, builder, signature, args):
        b = builder.bitcast(args[0], _I32)
        half = builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)  # IEEE: to nearest even
        nan = _i16(builder, builder.or_(builder.and_(builder.lshr(b, _k(16)), _k(0x8000)), _k(0x7E00)))
        return builder.zext(builder.select(builder.fcmp_unordered("uno", args[0], args[0]), nan, half), _I64)

    return types.int64(types.float32), codegen


@intrinsic
def _mul32_wrapping(typingctx, x, k):
    def codegen(context, builder, signature, args):
        a, b = (builder.trunc(v, _I32) if v.type.width > 32 else builder.zext(v, _I32) for v in args)
        return builder.zext(builder.mul(a, b), _I64)

    return types.int64(x, k), codegen


@overload(bf16_to_f32)
def _bf16_to_f32(h):
    return lambda h: _widen_bf16(h)


@overload(f16_to_f32)
def _f16_to_f32(h):
    return lambda h: _widen_f16(h)


@overload(f32_to_bf16)
def _f32_to_bf16(x):
    return lambda x: _narrow_bf16(np.float32(x))


@overload(f32_to_f16)
def _f32_to_f16(x):
    return lambda x: _narrow_f16(np.float32(x))


@overload(_mul32)
def _mul32_compiled(x, k):
    return lambda x, k: _mul32_wrapping(x, k)


def random32(seed, step, index):
    """32 random bits for element ``index`` at ``step``: the lowbias32 hash of a mixed counter."""
    x = (np.int64(seed) ^ _mul32(np.int64(step) & 0xFFFFFFFF, 0x9E3779B9)
         ^ _mul32(np.int64(index) & 0xFFFFFFFF, 0x85EBCA6B)) & 0xFFFFFFFF
    x ^= x >> 16
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


@register_jitable
def random16(seed, step, index):
    """16 random bits for element ``index`` at ``step``: the low half of ``random32``."""
    return random32(seed, step, index) & 0xFFFF


@intrinsic
def _random32_i32(typingctx, seed, step, index):
    # random32 in 32-bit lanes: written through _mul32 in Python, LLVM folds each multiply back to
    # 64 bits (and 4 lanes where 8 fit).
    def codegen(context, builder, signature, args):
        s, t, i = (builder.trunc(v, _I32) if v.type.width > 32 else builder.zext(v, _I32) for v in args)
        x = builder.xor(builder.xor(s, builder.mul(t, _k(0x9E3779B9))), builder.mul(i, _k(0x85EBCA6B)))
        x = builder.xor(x, builder.lshr(x, _k(16)))
        x = builder.mul(x, _k(0x7FEB352D))
        x = builder.xor(x, builder.lshr(x, _k(15)))
        x = builder.mul(x, _k(0x846CA68B))
        return builder.zext(builder.xor(x, builder.lshr(x, _k(16))), _I64)

    return types.int64(seed, step, index), codegen


@overload(random32)
def _random32_compiled(seed, step, index):
    return lambda seed, step, index: _random32_i32(seed, step, index)


def f32_to_bf16_stochastic(x, bits16):
    """Round down or up with probability in proportion to the distance: unbiased on average."""
    b = f32_bits(x)
    if (b & 0x7FFFFFFF) >= 0x7F800000:
        return f32_to_bf16(x)
    return ((b + bits16) >> 16) & 0xFFFF


@overload(f32_to_bf16_stochastic)
def _f32_to_bf16_stochastic_compiled(x, bits16):
    return lambda x, bits16: _narrow_bf16_stochastic(np.float32(x), bits16)


@register_jitable
def load_half(h, fmt):
    if fmt == FLOAT16:
        return f16_to_f32(h)
    return bf16_to_f32(h)


@register_jitable
def store_half(x, fmt):
    if fmt == FLOAT16:
        return f32_to_f16(x)
    return f32_to_bf16(x)


@register_jitable
def store_param(x, rounding, index):
    """Round the updated parameter to its storage: ``rounding = (fmt, stochastic, seed, step)``."""
    if rounding[1] != 0 and rounding[0] == BFLOAT16:
        return f32_to_bf16_stochastic(x, random16(rounding[2], rounding[3], index))
    return store_half(x, rounding[0])


# Element access that follows the array's storage, decided when a loop is compiled: uint16 arrays
# hold half-precision bits, float arrays their values. One loop thus serves half params with half
# state (every array uint16) and half params with float32 master weights and state (only the
# gradient and the written-back param are uint16). In the simulator these run as plain Python.


def load(a, i, fmt):
    """Element ``i`` of ``a`` in float32 (widened from half bits) or in its own precision."""
    return load_half(a[i], fmt) if a.dtype == np.uint16 else a[i]


def store(a, i, x, fmt):
    """Write ``x`` to element ``i`` of ``a``, rounded to nearest even when ``a`` holds half bits."""
    if a.dtype == np.uint16:
        a[i] = store_half(x, fmt)
    else:
        a[i] = x


#: The fields of the ``rounding`` tuple every half kernel takes (``store_rounded``), in order.
ROUNDING_FIELDS = ("fmt", "stochastic", "seed", "step", "index_base")


def store_rounded(p, i, x, rounding):
    """Write the updated parameter ``x`` to element ``i`` of ``p``: rounded as ``rounding`` says when
    ``p`` holds half bits, as it is into a float32 master. ``rounding = (fmt, stochastic, seed, step,
    index_base)``: the random bits hash the element's index in the whole buffer, ``index_base + i``
    (a shard of a buffer draws the bits the whole buffer's step would)."""
    if p.dtype == np.uint16:
        p[i] = store_param(x, rounding, np.int64(i) + np.int64(rounding[4]))
    else:
        p[i] = x


def store_updated(p, half_param, i, x, rounding):
    """``store_rounded``, and with a float32 master ``p`` also the half param ``half_param``, rounded
    to nearest even."""
    store_rounded(p, i, x, rounding)
    if p.dtype != np.uint16:
        half_param[i] = store_half(x, rounding[0])


@overload(load)
def _load(a, i, fmt):
    if a.dtype == types.uint16:
        return lambda a, i, fmt: load_half(a[i], fmt)
    return lambda a, i, fmt: a[i]


@overload(store)
def _store(a, i, x, fmt):
    if a.dtype == types.uint16:
        def impl(a, i, x, fmt):
            a[i] = store_half(x, fmt)
    else:
        def impl(a, i, x, fmt):
            a[i] = x
    return impl


@overload(store_rounded)
def _store_rounded(p, i, x, rounding):
    if p.dtype == types.uint16:
        def impl(p, i, x, rounding):
            p[i] = store_param(x, rounding, np.int64(i) + np.int64(rounding[4]))
    else:
        def impl(p, i, x, rounding):
            p[i] = x
    return impl


@overload(store_updated)
def _store_updated(p, half_param, i, x, rounding):
    if p.dtype == types.uint16:
        return lambda p, half_param, i, x, rounding: store_rounded(p, i, x, rounding)

    def impl(p, half_param, i, x, rounding):
        store_rounded(p, i, x, rounding)
        half_param[i] = store_half(x, rounding[0])

    return impl
