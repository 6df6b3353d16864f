"""GPU only: arrays of every kind through ``__cuda_array_interface__``, ordering on torch's
streams, and a step captured in a CUDA graph (CuPy)."""

import numpy as np
import pytest
from family_cases import describe, reference_run
from gpukit import SHAPES, STEPS, host, put, put_all
from helpers import problem, trajectory_error

import gpuadam

pytestmark = pytest.mark.usefixtures("real_gpu")

KW = {"amsgrad": True, "weight_decay": 0.01, "lr": 1e-2}
#: GPU clock cycles ``torch.cuda._sleep`` holds a stream for: tens of milliseconds on any GPU, so a
#: step that did not wait for the grad's writer would run, and read it, first.
SLEEP_CYCLES = 1 << 27


def _check(got, params0, grads):
    for i, (p, p0, (rp, _)) in enumerate(zip(got, params0, reference_run("Adam", describe("Adam", KW)[0],
                                                                         params0, grads))):
        assert np.abs(rp - p0).max() > 0
        err = trajectory_error(p, rp, p0, len(grads))
        assert err < 1.0, f"param {i}: {err:.3g}x the rounding budget from the float64 reference"


@pytest.mark.parametrize("kind", ["numba", "cupy", "torch"])
def test_every_array_kind_on_each_backend(backend, kind):
    """The params (updated in place: read back through the caller's own object), grads and the state
    the backend allocates beside them."""
    params0, grads = problem(20, shapes=SHAPES, steps=STEPS)
    params = put_all(params0, kind)
    opt = gpuadam.Adam(params, backend=backend, **KW)
    assert opt.backend == backend
    for g in grads:
        opt.step(put_all(g, kind))
    _check([host(p) for p in params], params0, grads)


def _ordering_problem():
    """A param, a zero grad and the grad's true values on the GPU: a step that read the grad before
    it was written would step with a zero grad (and move the param by its L2 decay alone)."""
    import torch

    rng = np.random.default_rng(22)
    n = SHAPES[0][0]
    p0 = rng.standard_normal(n).astype(np.float32)
    g_true = rng.standard_normal(n).astype(np.float32)
    p, src = put(p0, "torch"), put(g_true, "torch")
    g = torch.zeros_like(p)
    torch.cuda.synchronize()
    return p0, g_true, p, g, src


def test_a_step_on_torchs_default_stream_follows_the_grads_writer(backend):
    """Both backends launch on the legacy default stream, which is torch's default stream: ordered."""
    import torch

    p0, g_true, p, g, src = _ordering_problem()
    opt = gpuadam.Adam([p], backend=backend, **KW)
    torch.cuda._sleep(SLEEP_CYCLES)
    g.copy_(src)
    opt.step([g])
    torch.cuda.synchronize()
    _check([host(p)], [p0], [[g_true]])


def test_a_cupy_step_on_a_torch_side_stream_follows_the_grads_writer():
    """The cupy backend launches on CuPy's current stream: made torch's side stream, the step (with
    its device-side clipping) runs after the kernel that writes the grad on that stream."""
    import cupy
    import torch

    p0, g_true, p, g, src = _ordering_problem()
    opt = gpuadam.Adam([p], backend="cupy", **KW)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), cupy.cuda.ExternalStream(side.cuda_stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        g.copy_(src)
        opt.step([g], max_grad_norm=1e9)
    side.synchronize()
    torch.cuda.synchronize()
    _check([host(p)], [p0], [[g_true]])


def test_numba_cuda_ignores_a_torch_side_stream():
    """The gap, shown so it cannot pass unnoticed: numba-cuda launches on Numba's default stream and
    has no way to take torch's current stream, so a torch tensor written on a side stream must be
    synchronised by the caller first. Without that the step runs before the write (this test also
    proves the side-stream test above could fail: the sleep is long enough to expose a race)."""
    import torch

    p0, g_true, p, g, src = _ordering_problem()
    # a first step compiles and loads the kernel: that must not happen inside the race
    warm = put(p0, "torch")
    gpuadam.Adam([warm], backend="numba-cuda", **KW).step([src])
    torch.cuda.synchronize()
    opt = gpuadam.Adam([p], backend="numba-cuda", **KW)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        g.copy_(src)
        opt.step([g])
    side.synchronize()
    torch.cuda.synchronize()
    # the step read the zero grad (the L2 decay still moved the param): had numba-cuda waited for the
    # side stream, this would fail; then give it a test like the cupy one and drop this
    _check([host(p)], [p0], [[np.zeros_like(g_true)]])
    # what a caller does today: synchronise the side stream before the step
    q = put(p0, "torch")
    opt = gpuadam.Adam([q], backend="numba-cuda", **KW)
    g.zero_()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        g.copy_(src)
    side.synchronize()
    opt.step([g])
    torch.cuda.synchronize()
    _check([host(q)], [p0], [[g_true]])


@pytest.mark.parametrize("options,step_kw", [({}, {}), ({"skip_nonfinite": True}, {}),
                                             ({"skip_nonfinite": True}, {"max_grad_norm": 1.0})],
                         ids=["plain", "skip_nonfinite", "clipped"])
def test_cupy_graph_of_one_step_replayed_n_times_equals_n_steps(options, step_kw):
    """Capture one capturable step on a CuPy stream (its reduction and preparation kernels with it),
    replay it N times: the same optimizer stepped N times without a graph agrees bit for bit, step
    counts included; with clipping to the last bits only (the norm's atomic adds come in any order)."""
    import cupy

    n_replays = 5
    params0, grads = problem(21, shapes=SHAPES, steps=1)

    def build():
        params, gs = put_all(params0, "cupy"), put_all(grads[0], "cupy")
        return params, gs, gpuadam.Adam(params, backend="cupy", capturable=True, **KW, **options)

    a_params, a_grads, a = build()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        a.step(a_grads, **step_kw)  # compiles and loads every kernel outside the capture
        stream.synchronize()
        stream.begin_capture()
        a.step(a_grads, **step_kw)
        graph = stream.end_capture()
        for _ in range(n_replays):
            graph.launch(stream)
        stream.synchronize()
    b_params, b_grads, b = build()
    for _ in range(n_replays + 1):
        b.step(b_grads, **step_kw)
    cupy.cuda.Device().synchronize()
    assert a.steps == b.steps == [n_replays + 1] * len(SHAPES)
    same = np.testing.assert_array_equal if not step_kw else (
        lambda x, y, err_msg: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=err_msg))
    for i, (x, y) in enumerate(zip(a_params, b_params)):
        same(host(x), host(y), err_msg=f"param {i}")
    for s, t in zip(a.state, b.state):
        for name in s:
            same(host(s[name]), host(t[name]), err_msg=name)
    assert not np.array_equal(host(a_params[0]), params0[0])
