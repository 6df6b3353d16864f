"""The int8-state Adam kernel (``kernels/lean_cuda.py``) in Numba's CUDA simulator, against the host
kernel: one thread block per quantisation block, the block's absmax (the simulator's tree reduction,
``lean_cuda._tree_max2``: it has no shuffles), a partial last block, a skipped step."""

import numpy as np
import pytest
from numba import cuda

import gpuadam
from gpuadam.hyper import AdamHyper
from gpuadam.kernels import lean_cpu, lean_cuda
from gpuadam.kernels import lean_maps as L

N = 2 * L.BLOCK + 88  # three blocks, the last partial
MAPS = (L.SIGNED, L.SIGNED_BUCKETS, L.SIGNED_THRESHOLDS, L.UNSIGNED, L.UNSIGNED_BUCKETS, L.UNSIGNED_THRESHOLDS)


def _constants(skip=False):
    hyper = AdamHyper.from_kwargs(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                                  maximize=False, eps_root=0.0, bias_correction=True, decoupled_weight_decay=True)
    c = list(hyper.constants(7, np.float32, 1.0))
    if skip:
        c[-1] = np.float32(1)
    return tuple(np.float32(x) for x in c)


def _arrays(seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(N).astype(np.float32)
    g = (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 0, N)).astype(np.float32)
    mq = rng.integers(0, 256, N).astype(np.uint8)
    vq = rng.integers(0, 256, N).astype(np.uint8)
    ma = rng.uniform(0.01, 0.1, 3).astype(np.float32)
    va = rng.uniform(1e-4, 1e-3, 3).astype(np.float32)
    ma[1] = 0.0  # a block whose exp_avg was all zero
    return [p, g, mq, ma, vq, va]


def _on_simulator(arrays, c):
    dev = [cuda.to_device(a) for a in arrays]
    maps = [cuda.to_device(m) for m in MAPS]
    lean_cuda.launch("adam", *dev, c, maps)
    return [d.copy_to_host() for d in dev]


def test_int8_kernel_matches_the_host_kernel():
    assert lean_cuda._block_max2 is lean_cuda._tree_max2  # compiled kernels shuffle: test_machine_code
    arrays = _arrays(1)
    c = _constants()
    host = [a.copy() for a in arrays]
    lean_cpu.KERNELS["adam/int8"](*host[:6], c)
    sim = _on_simulator(arrays, c)
    p, _, mq, ma, vq, va = sim
    np.testing.assert_allclose(p, host[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ma, host[3], rtol=1e-6)
    np.testing.assert_allclose(va, host[5], rtol=1e-6)
    for got, want in ((mq, host[2]), (vq, host[4])):
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01
    # the absmax is each block's largest magnitude: some code of each block is the map's end (1, or
    # -0.99297 for a negative exp_avg: the signed map has no -1)
    for q, codes, absmax in ((mq, L.SIGNED, ma), (vq, L.UNSIGNED, va)):
        values = L.dequantize(q, absmax, codes)
        for b in range(3):
            block = np.abs(values[b * L.BLOCK : (b + 1) * L.BLOCK])
            assert -L.SIGNED[0] * absmax[b] <= block.max() <= absmax[b]


def test_a_skipped_step_changes_nothing():
    arrays = _arrays(2)
    sim = _on_simulator(arrays, _constants(skip=True))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, sim))


def test_bf16_kernel_matches_the_host_kernel():
    """The same random bits as the host (the shared hash): each moment the host's, or (where the
    simulator's float64 square root moved the float32 moment) a neighbouring bfloat16."""
    rng = np.random.default_rng(3)
    n = 300
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    v = (rng.uniform(0.1, 1, n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    c = _constants()
    for stochastic in (0, 1):
        host = [a.copy() for a in (p, g, m, v)]
        lean_cpu.KERNELS["adam/bf16state"](*host, c, (stochastic, 5, 9))
        dev = [cuda.to_device(a) for a in (p, g, m, v)]
        lean_cuda.BF16["adam", bool(stochastic)][4, 32](*dev, c, (stochastic, 5, 9), 0, None)
        sim = [d.copy_to_host() for d in dev]
        np.testing.assert_allclose(sim[0], host[0], rtol=1e-6, atol=1e-7)
        for got, want in ((sim[2], host[2]), (sim[3], host[3])):
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() <= 1 and (diff == 0).mean() > 0.95, (stochastic, diff.max())


@pytest.mark.parametrize("cls", ["Adam", "NAdam", "RAdam"])
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_optimizer_with_lean_state_on_device_is_the_host_optimizer(state_dtype, cls, monkeypatch):
    """``gpuadam.Adam(state_dtype=...)`` (and NAdam's, RAdam's: the rule's own kernels) on
    numba-cuda: the same params and state as on numba-cpu,
    with the constants on the device (clipping, a skipped non-finite step) and across a state_dict
    round trip; one tensor in int8 state over two blocks (the 4096-element floor lowered to one
    block: the simulator runs every thread in Python), the small one in float32 state."""
    from gpuadam import lean

    monkeypatch.setattr(lean, "MIN_SIZE", L.BLOCK)
    rng = np.random.default_rng(4)
    shapes = [(L.BLOCK + 40,), (3, 5)]
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    grads[1][0][7] = np.nan
    kw = {"lr": 1e-2, "weight_decay": 0.01, "state_dtype": state_dtype, "skip_nonfinite": True}
    host = [p.copy() for p in p0]
    dev = [cuda.to_device(p) for p in p0]
    ref = getattr(gpuadam, cls)(host, backend="numba-cpu", **kw)
    opt = getattr(gpuadam, cls)(dev, **kw)
    assert opt.backend == "numba-cuda" and lean.NAMES[state_dtype][0] in opt.state[0]
    for t, g in enumerate(grads):
        if t == 2:  # continue from a copy of the state, as a resumed run would
            opt2 = getattr(gpuadam, cls)(dev, **kw)
            opt2.load_state_dict(opt.state_dict())
            opt = opt2
        ref.step(g, max_grad_norm=5.0)
        opt.step([cuda.to_device(x) for x in g], max_grad_norm=5.0)
    assert opt.steps_skipped == ref.steps_skipped == 1
    for d, h in zip(dev, host):
        np.testing.assert_array_equal(d.copy_to_host(), h)
    for s, r in zip(opt.state, ref.state):
        assert set(s) == set(r)
        for name in r:
            np.testing.assert_array_equal(s[name].copy_to_host(), r[name], err_msg=name)


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("half", [np.float16, "bfloat16"])
def test_half_params_with_master_weights_and_lean_state_on_device(state_dtype, half, monkeypatch):
    """Half params, float32 masters, lean moments on numba-cuda: the masters, the moments and the
    half params (the masters rounded to nearest) are numba-cpu's, the half gradient widened on load."""
    from gpuadam import lean

    monkeypatch.setattr(lean, "MIN_SIZE", L.BLOCK)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(half)
    rng = np.random.default_rng(5)
    shapes = [(L.BLOCK + 40,), (3, 5)]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]
    bits = [p.view(np.uint16) for p in p0]
    kw = {"lr": 1e-2, "state_dtype": state_dtype, "master_weights": True, "half_format": str(dtype)}
    host = [b.copy() for b in bits]
    dev = [cuda.to_device(b) for b in bits]
    ref = gpuadam.Adam(host, backend="numba-cpu", **kw)
    opt = gpuadam.Adam(dev, **kw)
    assert opt.backend == "numba-cuda" and lean.NAMES[state_dtype][0] in opt.state[0]
    for g in grads:
        ref.step([x.view(np.uint16) for x in g])
        opt.step([cuda.to_device(x.view(np.uint16)) for x in g])
    for d, h in zip(dev, host):
        np.testing.assert_array_equal(d.copy_to_host(), h)
    for s, r in zip(opt.state, ref.state):
        assert set(s) == set(r) and "master" in r
        for name in r:
            np.testing.assert_array_equal(s[name].copy_to_host(), r[name], err_msg=name)
