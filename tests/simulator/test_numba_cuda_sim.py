"""The Numba CUDA kernels, run by the simulator on ``numba.cuda`` device arrays, against the reference."""

import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba import cuda

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import FLAG_GRID, adam_kwargs, problem, reference_trajectory, trajectory_error  # noqa: E402

import gpuadam  # noqa: E402
from gpuadam.hyper import AdamHyper  # noqa: E402
from gpuadam.kernels import numba_cuda  # noqa: E402

# Several tensors, odd sizes, and one that loops over the grid stride of the small launches (conftest).
SHAPES = [(700,), (3, 5), (1,), (2, 129)]


def test_simulator_is_active_and_backend_available():
    assert numba.config.ENABLE_CUDASIM  # numba.cuda has no simulator_enabled: read the switch itself
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


def _run(options, grads_seq, params0, step_kw=None, poison_at=None):
    params = [cuda.to_device(p) for p in params0]
    opt = gpuadam.Adam(params, amsgrad=True, weight_decay=0.01, **options)
    for t, g in enumerate(grads_seq):
        dev = [cuda.to_device(x) for x in g]
        if t == poison_at:
            bad = g[1].copy()
            bad.flat[0] = np.nan
            dev[1] = cuda.to_device(bad)
        opt.step(dev, **(step_kw or {}))
    return opt, [p.copy_to_host() for p in params]


def test_capturable_equals_default_mode_bit_for_bit():
    params0, grads = problem(14, shapes=SHAPES, steps=3)
    _, default = _run({}, grads, params0)
    opt, captured = _run({"capturable": True}, grads, params0)
    assert opt.steps == [3] * len(SHAPES)
    for a, b in zip(default, captured):
        np.testing.assert_array_equal(a, b)


def test_capturable_step_makes_no_device_to_host_copy(monkeypatch):
    from numba.cuda.simulator.cudadrv import devicearray

    params0, grads = problem(15, shapes=SHAPES, steps=2)
    params = [cuda.to_device(p) for p in params0]
    opt = gpuadam.Adam(params, capturable=True, skip_nonfinite=True)
    dev_grads = [[cuda.to_device(x) for x in g] for g in grads]
    copies = []
    real = devicearray.FakeCUDAArray.copy_to_host

    def spy(self, *args, **kwargs):
        copies.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(devicearray.FakeCUDAArray, "copy_to_host", spy)
    for g in dev_grads:
        opt.step(g, max_grad_norm=1.0, grad_scale=2.0)
    assert copies == []
    monkeypatch.undo()
    assert opt.steps == [2] * len(SHAPES)  # reading the count is the caller's synchronisation


def test_bookkeeping_kernels_run_on_the_backends_stream(monkeypatch):
    """The reduction and preparation kernels go to the stream the backend names (CuPy's current
    stream on the cupy backend), so a captured graph holds them with the updates."""
    from gpuadam import backends

    stream = cuda.stream()
    monkeypatch.setattr(backends.NumbaCUDA, "numba_stream", lambda self: stream)
    launched = []
    real = numba_cuda._cached

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, config):
            launched.append(config[2] if len(config) > 2 else 0)
            return self.kernel[config]

    monkeypatch.setattr(numba_cuda, "_cached", lambda key, make: Spy(real(key, make)))
    params0, grads = problem(18, shapes=SHAPES, steps=2)
    _, on_stream = _run({"capturable": True, "skip_nonfinite": True}, grads, params0,
                        step_kw={"max_grad_norm": 1.0})
    assert launched and all(s is stream for s in launched), launched
    monkeypatch.undo()
    _, default = _run({"capturable": True, "skip_nonfinite": True}, grads, params0, step_kw={"max_grad_norm": 1.0})
    for a, b in zip(on_stream, default):
        np.testing.assert_array_equal(a, b)


def test_device_lr_written_on_the_device_is_the_lr_of_the_next_step():
    """What a schedule does between replays of a captured step: write ``device_lr``, not the group."""
    params0, grads = problem(19, shapes=SHAPES, steps=2)
    params = [cuda.to_device(p) for p in params0]
    opt = gpuadam.Adam(params, lr=1e-3, capturable=True)
    host = [p.copy() for p in params0]
    ref = gpuadam.Adam(host, lr=1e-3, backend="numba-cpu")
    opt.step([cuda.to_device(x) for x in grads[0]])
    ref.step(grads[0])
    opt.device_lr.copy_to_device(np.array([5e-3]))
    ref.param_groups[0]["lr"] = 5e-3
    opt.step([cuda.to_device(x) for x in grads[1]])
    ref.step(grads[1])
    for d, h in zip(params, host):
        np.testing.assert_allclose(d.copy_to_host(), h, rtol=1e-6, atol=1e-7)
    with pytest.raises(AttributeError, match="capturable"):
        _ = gpuadam.Adam([cuda.to_device(p) for p in params0]).device_lr


def test_device_skip_of_a_nonfinite_step_changes_nothing():
    params0, grads = problem(16, shapes=SHAPES, steps=3)
    opt, skipped = _run({"skip_nonfinite": True}, grads, params0, poison_at=1)
    assert opt.steps_skipped == 1
    assert opt.steps == [2] * len(SHAPES)
    _, clean = _run({}, [grads[0], grads[2]], params0)
    for a, b in zip(skipped, clean):
        np.testing.assert_array_equal(a, b)


def test_device_clipping_matches_the_cpu_backend():
    params0, grads = problem(17, shapes=SHAPES, steps=3)
    opt, on_device = _run({}, grads, params0, step_kw={"max_grad_norm": 2.0})
    host = [p.copy() for p in params0]
    ref = gpuadam.Adam(host, amsgrad=True, weight_decay=0.01, backend="numba-cpu")
    for g in grads:
        ref.step(g, max_grad_norm=2.0)
    assert opt.last_grad_norm.copy_to_host()[0] == pytest.approx(ref.last_grad_norm, rel=1e-5)
    for a, b in zip(on_device, host):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
