"""Half precision on each GPU backend against the CPU backend: float16 and bfloat16 params with
half state and with float32 master weights, stochastic rounding; and the rounding itself, bit for
bit the CPU's on every target (the hash is shared)."""

import numpy as np
import pytest
from gpukit import SHAPES, SIM, STEPS, host, native, put_all
from helpers import problem
from numba import cuda  # at module level: the simulator swaps it in a kernel's globals

import gpuadam
from gpuadam.kernels import lowp

ml_dtypes = pytest.importorskip("ml_dtypes")

#: format -> (NumPy dtype of the params, half_format keyword, mantissa bits)
FORMATS = {"float16": (np.float16, None, 10), "bfloat16": (np.uint16, "bfloat16", 7)}


def _half(x: np.ndarray, fmt: str) -> np.ndarray:
    return x.astype(np.float16) if fmt == "float16" else x.astype(ml_dtypes.bfloat16).view(np.uint16)


def _widen(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of half params or state, given as their dtype or as uint16 bit patterns."""
    return x.view(np.float16 if fmt == "float16" else ml_dtypes.bfloat16).astype(np.float32)


def _pair(backend, fmt, kw, seed):
    """The same half problem stepped on ``backend`` and on the CPU backend."""
    params32, grads32 = problem(seed, shapes=SHAPES, steps=STEPS)
    params = [_half(p, fmt) for p in params32]
    grads = [[_half(g, fmt) for g in gs] for gs in grads32]
    kind = native(backend)
    dev = put_all(params, kind)
    options = dict(lr=1e-2, half_format=FORMATS[fmt][1], **kw)
    opt = gpuadam.Adam(dev, backend=backend, **options)
    cpu = [p.copy() for p in params]
    ref = gpuadam.Adam(cpu, backend="numba-cpu", **options)
    for g in grads:
        opt.step(put_all(g, kind))
        ref.step(g)
    return opt, dev, ref, cpu, params


def _agree(fmt, got_bits, want_bits, start_bits):
    """Equal but for a rare element whose float32 value before rounding sat on a rounding boundary
    on one target and not the other (another compiler may fuse a multiply-add): those differ by a
    unit or two in the last place of the format, nothing more."""
    got, want, start = (_widen(x, fmt).astype(np.float64) for x in (got_bits, want_bits, start_bits))
    assert np.abs(want - start).max() > 0, "the params did not move: the case proves nothing"
    ulp = 2.0 ** -FORMATS[fmt][2]
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
    assert rel.max() <= 2 * ulp, f"{rel.max():.3g} relative off, {2 * ulp:.3g} allowed"
    same = np.mean(got_bits.view(np.uint16) == want_bits.view(np.uint16))
    assert same >= 0.999, f"only {same:.4%} of the elements bit for bit the CPU's"


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_params_with_half_state(backend, fmt):
    opt, dev, ref, cpu, params = _pair(backend, fmt, {"amsgrad": True}, 50)
    for d, c, p0, s, t in zip(dev, cpu, params, opt.state, ref.state):
        _agree(fmt, host(d).reshape(-1), c.reshape(-1), p0.reshape(-1))
        for n in t:  # half state is kept as the format's bit patterns
            assert host(s[n]).dtype == t[n].dtype == np.uint16, (n, host(s[n]).dtype, t[n].dtype)
            _agree(fmt, host(s[n]).reshape(-1), t[n].reshape(-1), np.zeros_like(t[n].reshape(-1)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_params_with_master_weights(backend, fmt):
    opt, dev, ref, cpu, params = _pair(backend, fmt, {"master_weights": True, "weight_decay": 0.01}, 51)
    for d, c, p0, s, t in zip(dev, cpu, params, opt.state, ref.state):
        assert set(s) == set(t) and "master" in s
        for n in t:
            np.testing.assert_allclose(host(s[n]).reshape(-1), t[n].reshape(-1), rtol=1e-5, atol=1e-7)
        _agree(fmt, host(d).reshape(-1), c.reshape(-1), p0.reshape(-1))


def test_stochastic_rounding_matches_the_cpu(backend):
    kw = {"stochastic_rounding": True, "seed": 9, "weight_decay": 0.1}
    opt, dev, ref, cpu, params = _pair(backend, "bfloat16", kw, 52)
    for d, c, p0 in zip(dev, cpu, params):
        _agree("bfloat16", host(d).reshape(-1), c.reshape(-1), p0.reshape(-1))


ROUNDING = (lowp.BFLOAT16, 1, 1234, 17)  # (format, stochastic, seed, counter)
N_ROUNDED = 300 if SIM else 1 << 20


def _rounding_input(n):
    x = (np.random.default_rng(3).standard_normal(n) * 3).astype(np.float32)
    x[:4] = [np.inf, -np.inf, np.nan, 0.0]
    return x


def _cpu_rounding(x):
    from numba import njit

    @njit
    def on_host(x, out, lp):
        for i in range(x.size):
            out[i] = lowp.store_param(x[i], lp, i)

    out = np.zeros(x.size, np.uint16)
    on_host(x, out, ROUNDING)
    assert len(set(out.tolist())) > 100
    return out


def test_numba_cuda_rounds_each_element_as_the_cpu():
    x = _rounding_input(N_ROUNDED)

    def body(x, out, lp):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = lowp.store_param(x[i], lp, i)

    out = cuda.to_device(np.zeros(x.size, np.uint16))
    cuda.jit(body)[(x.size + 255) // 256, 256](cuda.to_device(x), out, ROUNDING)
    np.testing.assert_array_equal(out.copy_to_host(), _cpu_rounding(x))


def test_cupy_rounds_each_element_as_the_cpu(real_gpu):
    import cupy

    from gpuadam.kernels.cupy_lowp import LOWP_SOURCE

    x = _rounding_input(N_ROUNDED)
    kernel = cupy.ElementwiseKernel(
        "float32 x, int32 fmt, int32 stochastic, uint32 seed, uint32 counter", "uint16 out",
        "out = lowp_store_param(x, fmt, stochastic, seed, counter, (unsigned int)i)",
        "gpuadam_test_rounding", preamble=LOWP_SOURCE)
    out = cupy.zeros(x.size, np.uint16)
    fmt, stochastic, seed, counter = ROUNDING
    kernel(cupy.asarray(x), np.int32(fmt), np.int32(stochastic), np.uint32(seed), np.uint32(counter), out)
    np.testing.assert_array_equal(out.get(), _cpu_rounding(x))
