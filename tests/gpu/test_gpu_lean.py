"""Lean optimizer state (``state_dtype``) on the GPU backends against numba-cpu: int8 codes with one
absmax per block, and bfloat16 moments, for Adam, NAdam and RAdam (each rule's own lean kernels);
each with the constants computed on the host, and on the device (clipping). On a GPU fused
multiply-adds may move a value across a rounding boundary, so the params agree to float32 rounding
and the codes to within one. The simulator runs numba-cuda only, with clipping (CuPy's kernels are
proven on the host: tests/test_cupy_lean_host.py)."""

import numpy as np
import pytest
from gpukit import SIM, host, native, put_all

import gpuadam
from gpuadam import lean
from gpuadam.kernels import lean_maps

SHAPES = [(lean_maps.BLOCK + 40,), (3, 5)] if SIM else [(1_000_003,), (257, 3), (5,)]
#: max_grad_norm: constants made on the device (the kernels' device-constants variants), or on the host
CLIPS = [50.0] if SIM else [50.0, None]


#: Adam with each kind of constants; NAdam and RAdam (their own kernels, compiled on the GPU too)
#: with the device's, to keep the kit's time
CASES = [("Adam", clip) for clip in CLIPS] + [("NAdam", CLIPS[0]), ("RAdam", CLIPS[0])]


@pytest.mark.parametrize("cls,clip", CASES, ids=lambda c: c if isinstance(c, str) else
                         ("device-constants" if c else "host-constants"))
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_lean_state_on_the_gpu_follows_the_host(state_dtype, backend, clip, cls, monkeypatch):
    if SIM:  # every simulated thread is Python: int8 from one block on
        monkeypatch.setattr(lean, "MIN_SIZE", lean_maps.BLOCK)
    rng = np.random.default_rng(12)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    kw = {"lr": 1e-2, "weight_decay": 0.01, "state_dtype": state_dtype}
    cpu = [p.copy() for p in p0]
    kind = native(backend)
    dev = put_all(p0, kind)
    ref = getattr(gpuadam, cls)(cpu, backend="numba-cpu", **kw)
    opt = getattr(gpuadam, cls)(dev, backend=backend, **kw)
    assert lean.NAMES[state_dtype][0] in opt.state[0]
    for g in grads:
        ref.step(g, max_grad_norm=clip)
        opt.step(put_all(g, kind), max_grad_norm=clip)
    for d, c, p in zip(dev, cpu, p0):
        assert np.abs(c - p).max() > 0
        np.testing.assert_allclose(host(d), c, rtol=1e-5, atol=1e-6)
    for name in lean.NAMES[state_dtype]:
        got, want = host(opt.state[0][name]), ref.state[0][name]
        if name.endswith("_codes"):
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, name
        elif name.endswith("_absmax"):
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
        else:  # bfloat16 bits: one step of the last place at most
            assert np.abs(got.view(np.int16).astype(int) - want.view(np.int16).astype(int)).max() <= 1, name


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_half_params_with_masters_and_lean_state_on_the_gpu(state_dtype, backend, monkeypatch):
    """float16 params, float32 masters, lean moments (the ``/master`` kernels): the masters follow
    the host's to float32 rounding, each half param is its master rounded to nearest."""
    if SIM:
        monkeypatch.setattr(lean, "MIN_SIZE", lean_maps.BLOCK)
    rng = np.random.default_rng(13)
    p0 = [rng.standard_normal(s).astype(np.float16) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float16) for s in SHAPES] for _ in range(3)]
    kw = {"lr": 1e-2, "state_dtype": state_dtype, "master_weights": True}
    cpu = [p.copy() for p in p0]
    kind = native(backend)
    dev = put_all(p0, kind)
    ref = gpuadam.Adam(cpu, backend="numba-cpu", **kw)
    opt = gpuadam.Adam(dev, backend=backend, **kw)
    assert lean.NAMES[state_dtype][0] in opt.state[0] and "master" in opt.state[0]
    for g in grads:
        ref.step(g)
        opt.step(put_all(g, kind))
    for d, s, t in zip(dev, opt.state, ref.state):
        master = host(s["master"]).reshape(-1)
        np.testing.assert_allclose(master, t["master"].reshape(-1), rtol=1e-5, atol=1e-6)
        assert np.array_equal(host(d).reshape(-1), master.astype(np.float16))
