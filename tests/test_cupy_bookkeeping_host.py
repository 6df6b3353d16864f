"""The cupy backend's bookkeeping kernels without a GPU: their C on the host, their PTX for sm_90.

1. ``c_from_python`` translates every rule's constants function and ``grad_factor`` to C; compiled
   with g++ (no contraction), each returns the Python function's very bits over many steps and
   hyperparameters, and what the translator cannot take it refuses by name.
2. ``cupy_bookkeeping``'s two kernels — the very source CuPy is given — compile with g++ behind a
   one-thread shim of CUDA's built-ins and run through ctypes with the arguments the launcher passes
   (``prepare_args``): the sum of squares equals NumPy's sequential sum in the gradients' precision
   (half bits, FlatBuffer masks included), and the preparation equals ``grad_factor`` and the rule's
   constants function (skip, clip, lr override, host and device step counts).
3. Each kernel compiles to PTX for sm_90 with no local memory, and with ptxas, no spills.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil

import numpy as np
import pytest
from helpers import ONE_THREAD, build_host_library, call_with_args, narrow_half, widen_half

from gpuadam import machine_code as mc
from gpuadam.flat import FlatBuffer
from gpuadam.kernels import cupy_bookkeeping as cb
from gpuadam.kernels import lowp
from gpuadam.kernels.c_from_python import PREFIX, Unsupported, c_functions, tuple_length
from gpuadam.kernels.cupy_lowp import FN_SOURCE
from gpuadam.kernels.rules import N_CONSTANTS, RULES, SKIP, grad_factor

UNUSED_OK = ("-Wno-unused-function",)  # the shim's built-ins, and conversions a kernel does not call
CONSTANTS_FNS = {r.constants.__name__: r.constants for r in RULES.values()}


# ---------------------------------------------------------------------------------------------
# 1. The translated scalar functions


@pytest.fixture(scope="module")
def scalar_lib(tmp_path_factory):
    # one namespace per function: each translation carries its own callees
    parts = [ONE_THREAD, FN_SOURCE, "namespace factor {\n", c_functions(grad_factor),
             f'extern "C" void call_grad_factor(const double* a, double* out) '
             f'{{ {PREFIX}grad_factor(a[0], a[1], a[2], a[3], a[4], out); }}\n}}\n']
    for name, fn in CONSTANTS_FNS.items():
        parts += [f"namespace {name} {{\n", c_functions(fn),
                  f'extern "C" void call_{name}(double step, const double* hyper, double grad_mul, double* out) '
                  f'{{ {PREFIX}{name}(step, hyper, grad_mul, out); }}\n}}\n']
    return build_host_library(tmp_path_factory, "scalars", "".join(parts), UNUSED_OK)


def _hypers(name: str, rng: np.random.Generator) -> list[tuple]:
    """Hyperparameter tuples for ``name``: random values in each slot's range, every flag both ways."""
    n = tuple_length(CONSTANTS_FNS[name])
    out = []
    for _ in range(24):
        h = list(rng.uniform(0.0, 0.999, n))
        h[0] = 10 ** rng.uniform(-5, -1)  # lr
        flags = rng.integers(0, 2, n)
        out.append(tuple(float(f) if rng.random() < 0.3 else x for x, f in zip(h, flags)))
    return out


@pytest.mark.parametrize("name", sorted(CONSTANTS_FNS))
def test_translated_constants_are_the_python_bits(scalar_lib, name):
    fn = CONSTANTS_FNS[name]
    call = getattr(scalar_lib, f"call_{name}")
    call.argtypes = [ctypes.c_double, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p]
    rng = np.random.default_rng(len(name))
    checked = 0
    for hyper in _hypers(name, rng):
        for step in (1.0, 2.0, 3.0, 17.0, 1000.0, 123456.0):
            for grad_mul in (1.0, 0.25, -0.5):
                try:
                    want = fn(step, hyper, grad_mul)
                except (ValueError, ZeroDivisionError, OverflowError):
                    continue  # outside the domain the hyper records allow
                h = np.array(hyper, np.float64)
                out = np.full(N_CONSTANTS, np.nan)
                call(step, h.ctypes.data, grad_mul, out.ctypes.data)
                np.testing.assert_array_equal(out, np.array(want, np.float64), err_msg=f"{name}{hyper} step {step}")
                checked += 1
    assert checked > 100


def test_translated_grad_factor_is_the_python_bits(scalar_lib):
    call = scalar_lib.call_grad_factor
    call.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for sumsq in (0.0, 1e-30, 0.5, 4.0, 1e30, math.inf, math.nan):
        for nonfinite in (0.0, 3.0):
            for inv_scale in (1.0, 2.0 ** -10):
                for max_norm in (0.0, 1.0, 1e6):
                    for skip in (0.0, 1.0):
                        a = np.array([sumsq, nonfinite, inv_scale, max_norm, skip])
                        out = np.zeros(3)
                        call(a.ctypes.data, out.ctypes.data)
                        np.testing.assert_array_equal(out, np.array(grad_factor(*a), np.float64))


def _power(x, y):
    return x ** y


def _a_list(x):
    return [x]


def _while(x):
    while x > 1.0:
        x = x / 2.0
    return x


def _mixed(x):
    if x > 0.0:
        return (x, x)
    return x


@pytest.mark.parametrize("fn, what", [(_power, "x \\*\\* y"), (_a_list, "\\[x\\]"), (_while, "while"),
                                      (_mixed, "same kind of value")])
def test_the_translator_refuses_what_it_cannot_take_by_name(fn, what):
    with pytest.raises(Unsupported, match=what) as info:
        c_functions(fn)
    assert fn.__name__ in str(info.value)


# ---------------------------------------------------------------------------------------------
# 2. The kernels, one thread on the host

SUMSQ_CASES = [(np.float32, None), (np.float64, None), (np.float32, "bf16"), (np.float32, "f16")]


@pytest.fixture(scope="module")
def sumsq_libs(tmp_path_factory):
    """One library per kernel (each source carries the guarded half conversions it needs)."""
    libs = {}
    for k, (dtype, fmt) in enumerate(SUMSQ_CASES):
        for masked in (False, True):
            name, source = cb.sumsq_source(dtype, fmt, masked)
            libs[name] = build_host_library(tmp_path_factory, f"sumsq{k}{int(masked)}", ONE_THREAD + source, UNUSED_OK)
    return libs


@pytest.mark.parametrize("dtype, fmt", SUMSQ_CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("poison", [False, True])
def test_sumsq_kernel_is_the_sequential_sum_in_the_gradients_precision(sumsq_libs, dtype, fmt, masked, poison):
    rng = np.random.default_rng(5)
    buf = FlatBuffer([(5, 7), (1,), (300,), (17,)], np.float32 if fmt else dtype)
    keep = (np.arange(buf.size) % 16) < np.repeat(buf.valid_counts(), 16)
    buf.data[keep] = rng.standard_normal(np.count_nonzero(keep)) * 3
    buf.data[~keep] = 1e3  # what a masked sum must not see
    if poison:
        buf.data[3] = np.nan if fmt == "bf16" else np.inf
    if not masked:
        keep[:] = True
    inv = (np.float32 if fmt else dtype)(0.5)
    if fmt:
        code = lowp.BFLOAT16 if fmt == "bf16" else lowp.FLOAT16
        g = np.zeros(buf.size, np.uint16)
        narrow_half(buf.data, code, g)
        values = _widen(g, code)
    else:
        g = values = buf.data
    y = (values[keep] * inv).astype(values.dtype)
    want = [0.25 + float(np.cumsum(y * y, dtype=values.dtype)[-1]), 1.0 + np.count_nonzero(~np.isfinite(y))]
    sums = np.array([0.25, 1.0])  # the kernel adds to what is there
    name, _ = cb.sumsq_source(dtype, fmt, masked)
    valid = buf.valid_counts() if masked else sums
    call_with_args(getattr(sumsq_libs[name], name), (g, sums, inv, valid, np.uint64(g.size)))
    np.testing.assert_array_equal(sums, want)
    assert np.isfinite(sums[0]) != poison


def _widen(h, code):
    out = np.zeros(h.size, np.float32)
    widen_half(h, code, out)
    return out


@pytest.fixture(scope="module")
def prepare_lib(tmp_path_factory):
    parts = [ONE_THREAD]
    for k, fn in enumerate(CONSTANTS_FNS.values()):
        _, source = cb.prepare_source(fn)
        parts.append(f"namespace rule{k} {{\n{source}}}\n")
    return build_host_library(tmp_path_factory, "prepare", "".join(parts), UNUSED_OK)


def _expected(fn, sums, hyper, inv_scale, max_norm, skip_nonfinite, lr, group, steps, slot, last, host_step):
    norm, grad_mul, skip = grad_factor(sums[0], sums[1], inv_scale, max_norm, skip_nonfinite)
    steps = steps.copy()
    if skip:
        return norm, None, steps
    steps[slot] = host_step if host_step > 0 else steps[slot] + 1
    h = ((lr[group],) + tuple(hyper[1:])) if lr[group] >= 0 else tuple(hyper)
    return norm, np.array(fn(float(steps[slot]), h, grad_mul), np.float64), steps


def _in_domain(fn, hyper) -> bool:
    try:
        for step in range(1, 10):
            fn(float(step), hyper, 1.0)
    except (ValueError, ZeroDivisionError, OverflowError):
        return False
    return True


@pytest.mark.parametrize("name", sorted(CONSTANTS_FNS))
def test_prepare_kernel_is_grad_factor_then_the_rules_constants(prepare_lib, name):
    fn = CONSTANTS_FNS[name]
    kernel = getattr(prepare_lib, cb.prepare_source(fn)[0])
    hyper = next(h for h in _hypers(name, np.random.default_rng(9)) if _in_domain(fn, h))
    scenarios = [  # sums, max_norm, skip_nonfinite, lr, host_step, last
        ((4.0, 0.0), 0.0, False, [-1.0, -1.0], 0, True),
        ((400.0, 0.0), 1.5, False, [-1.0, -1.0], 0, False),  # clipped
        ((np.inf, 1.0), 0.0, True, [-1.0, -1.0], 0, True),  # skipped
        ((np.inf, 1.0), 0.0, False, [-1.0, -1.0], 0, True),  # not skipped: the step goes on
        ((1.0, 0.0), 0.0, False, [-1.0, 3e-3], 7, True),  # the device's lr, the host's count
    ]
    for sums0, max_norm, skip_nonfinite, lr, host_step, last in scenarios:
        sums = np.array(sums0, np.float64)
        lr_dev = np.array(lr)
        steps = np.array([3, 5], np.int64)
        c32, c64 = np.full(N_CONSTANTS, 7.0, np.float32), np.full(N_CONSTANTS, 7.0)
        norm, skipped = np.zeros(1), np.array([2], np.int64)
        group, slot = 1, 1
        want_norm, want_c, want_steps = _expected(fn, sums0, hyper, 0.5, max_norm, float(skip_nonfinite), lr, group,
                                                  steps, slot, last, host_step)
        call_with_args(kernel, cb.prepare_args(sums, hyper, 0.5, max_norm, skip_nonfinite, lr_dev, group, steps,
                                               slot, c32, c64, norm, skipped, last, host_step))
        np.testing.assert_array_equal(steps, want_steps)
        if last:
            np.testing.assert_array_equal(sums, [0.0, 0.0])
            np.testing.assert_array_equal(norm, [want_norm])
        else:
            np.testing.assert_array_equal(sums, sums0)
        if want_c is None:
            assert c64[SKIP] == 1.0 and c32[SKIP] == 1.0 and skipped[0] == 3
            continue
        assert skipped[0] == 2
        np.testing.assert_array_equal(c64, want_c)
        np.testing.assert_array_equal(c32, want_c.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# 3. PTX for sm_90


def _sources():
    for dtype, fmt in SUMSQ_CASES:
        for masked in (False, True):
            yield cb.sumsq_source(dtype, fmt, masked)
    for fn in CONSTANTS_FNS.values():
        yield cb.prepare_source(fn)


def test_every_bookkeeping_kernel_compiles_for_sm90_without_local_memory():
    missing = mc._cupy_compiler_missing()
    if missing:
        pytest.skip(missing)
    ptxas = shutil.which("ptxas") or (mc.find_ptxas() if mc.missing_requirements() is None else None)
    for name, source in _sources():
        ptx = mc.compile_source_ptx(source, name, "sm_90", cb.OPTIONS)
        assert f".entry {name}" in ptx
        assert ".local" not in ptx, name
        if name.startswith("gpuadam_sumsq_float") and "double" not in name:
            assert re.search(r"\badd(\.rn)?(\.ftz)?\.f32\b", ptx), f"{name}: the thread's sum is not in float32"
        if ptxas:
            registers, stack, spills = mc.ptxas_resources(ptx, "sm_90")
            assert stack == 0 and spills == 0, (name, registers, stack, spills)
