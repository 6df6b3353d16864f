"""The Numba CUDA kernels, run by the simulator on ``numba.cuda`` device arrays, against the reference."""

import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import FLAG_GRID, adam_kwargs, problem, reference_trajectory, trajectory_error  # noqa: E402

import gpuadam  # noqa: E402
from gpuadam.hyper import AdamHyper  # noqa: E402
from gpuadam.kernels import numba_cuda  # noqa: E402

# Several tensors, odd sizes, and one that needs more than one block of 256 threads.
SHAPES = [(700,), (3, 5), (1,), (2, 129)]


def test_simulator_is_active_and_backend_available():
    assert cuda.simulator_enabled if hasattr(cuda, "simulator_enabled") else True
    assert type(cuda.to_device(np.zeros(1))).__module__.startswith("numba.cuda.simulator")
    st = gpuadam.available_backends()["numba-cuda"]
    assert st.available and "simulator" in st.reason


@pytest.mark.parametrize("flags", FLAG_GRID[:7], ids=lambda f: ",".join(f) or "default")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_arrays_follow_the_reference(flags, dtype):
    hyper = AdamHyper(**flags)
    steps = 3
    params0, grads = problem(11, shapes=SHAPES, dtype=dtype, steps=steps)
    params = [cuda.to_device(p) for p in params0]
    opt = gpuadam.Adam(params, **adam_kwargs(hyper))
    assert opt.backend == "numba-cuda"
    for g in grads:
        opt.step([cuda.to_device(x) for x in g])
    for p, p0, (rp, rm, _, _), state in zip(params, params0, reference_trajectory(params0, grads, hyper), opt.state):
        got = p.copy_to_host()
        assert got.shape == p0.shape
        assert trajectory_error(got, rp, p0, steps) < 1.0
        assert np.abs(rp - p0).max() > 0
        np.testing.assert_allclose(state["exp_avg"].copy_to_host().reshape(p0.shape), rm, rtol=1e-5, atol=1e-7)


def test_grid_has_more_than_one_block_and_covers_every_element():
    n = 3 * numba_cuda.THREADS + 7
    assert numba_cuda._blocks(n) > 1
    p0 = np.arange(n, dtype=np.float32)
    p = cuda.to_device(p0)
    g = cuda.to_device(np.ones(n, np.float32))
    m = cuda.to_device(np.zeros(n, np.float32))
    v = cuda.to_device(np.zeros(n, np.float32))
    gpuadam.adam_step(p, g, m, v, step=1, lr=0.5)
    # first step with g = 1: every element moves by lr exactly (to float32 rounding)
    np.testing.assert_allclose(p.copy_to_host(), p0 - 0.5, rtol=1e-6)


def test_functional_amsgrad_on_device():
    rng = np.random.default_rng(2)
    host = [rng.standard_normal(301).astype(np.float32) for _ in range(5)]
    host[3] = np.abs(host[3])
    host[4] = host[3] * 1.5
    dev = [cuda.to_device(x) for x in host]
    gpuadam.adam_step(*dev, step=4, weight_decay=0.1, decoupled_weight_decay=True)
    ref = [x.copy() for x in host]
    gpuadam.adam_step(*ref, step=4, weight_decay=0.1, decoupled_weight_decay=True, backend="numba-cpu")
    for d, r in zip(dev, ref):
        np.testing.assert_allclose(d.copy_to_host(), r, rtol=2e-6, atol=1e-7)


def test_state_dict_roundtrip_on_device_is_bit_identical():
    params0, grads = problem(12, shapes=SHAPES, steps=4)
    a = [cuda.to_device(p) for p in params0]
    opt = gpuadam.Adam(a, amsgrad=True)
    for g in grads:
        opt.step([cuda.to_device(x) for x in g])
    b = [cuda.to_device(p) for p in params0]
    first = gpuadam.Adam(b, amsgrad=True)
    for g in grads[:2]:
        first.step([cuda.to_device(x) for x in g])
    second = gpuadam.Adam(b, amsgrad=True)
    second.load_state_dict(first.state_dict())
    for g in grads[2:]:
        second.step([cuda.to_device(x) for x in g])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.copy_to_host(), y.copy_to_host())


def test_host_grad_for_device_param_is_refused():
    p = cuda.to_device(np.zeros(4, np.float32))
    opt = gpuadam.Adam([p])
    with pytest.raises(ValueError, match="grad 0: expected an array on the device"):
        opt.step([np.zeros(4, np.float32)])
    np.testing.assert_array_equal(p.copy_to_host(), 0.0)


def test_flat_buffer_on_device_steps_in_one_launch():
    params0, grads = problem(13, shapes=SHAPES, steps=3)
    pbuf = gpuadam.FlatBuffer.from_arrays([cuda.to_device(p) for p in params0])
    assert pbuf.device == "cuda"
    gbuf = pbuf.zeros_like()
    opt = gpuadam.Adam(pbuf.views, weight_decay=0.01)
    host = [p.copy() for p in params0]
    ref = gpuadam.Adam(host, weight_decay=0.01, backend="numba-cpu")
    for g in grads:
        for view, x in zip(gbuf.views, g):
            view.copy_to_device(x)
        opt.step(gbuf.views, grad_scale=2.0)
        assert opt.last_step_launches == 1
        ref.step([x / np.float32(2.0) for x in g])
    for v, h in zip(pbuf.views, host):
        np.testing.assert_allclose(v.copy_to_host(), h, rtol=1e-6, atol=1e-7)
