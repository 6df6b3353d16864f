"""Half-precision params on the device (the simulator): master weights, declared bfloat16, rounding."""

import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda, njit

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import problem  # noqa: E402

import gpuadam  # noqa: E402
from gpuadam.kernels import lowp  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
SHAPES = [(300,), (3, 7)]


def _run(params, grads, to_device, **kw):
    dev = [to_device(p) for p in params]
    opt = gpuadam.Adam(dev, lr=1e-2, **kw)
    for g in grads:
        opt.step([to_device(x) for x in g])
    return opt, dev


def test_float16_master_weights_on_device_match_the_cpu():
    params32, grads32 = problem(50, shapes=SHAPES, steps=3)
    params = [p.astype(np.float16) for p in params32]
    grads = [[g.astype(np.float16) for g in gs] for gs in grads32]
    opt, dev = _run(params, grads, cuda.to_device, master_weights=True, amsgrad=True)
    assert opt.backend == "numba-cuda"
    host = [p.copy() for p in params]
    ref = gpuadam.Adam(host, lr=1e-2, master_weights=True, amsgrad=True, backend="numba-cpu")
    for g in grads:
        ref.step(g)
    for d, h, s, t in zip(dev, host, opt.state, ref.state):
        np.testing.assert_allclose(s["master"].copy_to_host(), t["master"], rtol=1e-6, atol=1e-7)
        got = d.copy_to_host().astype(np.float32)
        assert np.max(np.abs(got - h.astype(np.float32)) / np.maximum(np.abs(h.astype(np.float32)), 1e-3)) <= 2**-10


def test_uint16_declared_bfloat16_on_device_with_stochastic_rounding():
    bf16 = ml_dtypes.bfloat16
    params32, grads32 = problem(51, shapes=SHAPES, steps=3)
    params = [p.astype(bf16).view(np.uint16) for p in params32]
    grads = [[g.astype(bf16).view(np.uint16) for g in gs] for gs in grads32]
    kw = {"half_format": "bfloat16", "stochastic_rounding": True, "seed": 9}
    _, dev = _run(params, grads, cuda.to_device, **kw)
    host = [p.copy() for p in params]
    ref = gpuadam.Adam(host, lr=1e-2, backend="numba-cpu", **kw)
    for g in grads:
        ref.step(g)
    for d, h in zip(dev, host):
        got = d.copy_to_host().view(bf16).astype(np.float32)
        want = h.view(bf16).astype(np.float32)
        # same random bits per element; float32 math may differ in its last bit on another target
        assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3)) <= 2**-7


def test_every_target_rounds_each_element_alike():
    x = (np.random.default_rng(3).standard_normal(2000) * 3).astype(np.float32)
    lp = (lowp.BFLOAT16, 1, 1234, 17)

    def body(x, out, lp):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = lowp.store_param(x[i], lp, i)

    host_out = np.zeros(x.size, np.uint16)

    @njit
    def on_host(x, out, lp):
        for i in range(x.size):
            out[i] = lowp.store_param(x[i], lp, i)

    on_host(x, host_out, lp)
    dev_out = cuda.to_device(np.zeros(x.size, np.uint16))
    cuda.jit(body)[8, 256](cuda.to_device(x), dev_out, lp)
    np.testing.assert_array_equal(dev_out.copy_to_host(), host_out)
    assert len(set(host_out.tolist())) > 100


def test_a_family_optimizer_with_master_weights_on_device():
    params32, grads32 = problem(52, shapes=SHAPES, steps=3)
    params = [p.astype(np.float16) for p in params32]
    grads = [[g.astype(np.float16) for g in gs] for gs in grads32]
    dev = [cuda.to_device(p) for p in params]
    opt = gpuadam.RMSprop(dev, lr=1e-2, centered=True, momentum=0.9, master_weights=True)
    host = [p.copy() for p in params]
    ref = gpuadam.RMSprop(host, lr=1e-2, centered=True, momentum=0.9, master_weights=True, backend="numba-cpu")
    for g in grads:
        opt.step([cuda.to_device(x) for x in g])
        ref.step(g)
    for s, t in zip(opt.state, ref.state):
        np.testing.assert_allclose(s["master"].copy_to_host(), t["master"], rtol=1e-5, atol=1e-6)
