"""float16/bfloat16 params: master weights, half state with float32 math, stochastic rounding."""

import numpy as np
import pytest
from helpers import problem

import gpuadam
from gpuadam.kernels import numba_cpu

ml_dtypes = pytest.importorskip("ml_dtypes")
HALVES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
SHAPES = [(257, 3), (1,), (1000,)]


def _half_problem(seed, dtype, steps=8):
    params32, grads32 = problem(seed, shapes=SHAPES, steps=steps)
    params = [p.astype(dtype) for p in params32]
    grads = [[g.astype(dtype) for g in gs] for gs in grads32]
    return params, grads


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_master_weights_follow_the_float32_trajectory_exactly(dtype, amsgrad):
    params, grads = _half_problem(40, dtype)
    opt = gpuadam.Adam(params, lr=1e-2, amsgrad=amsgrad, weight_decay=0.01, master_weights=True)
    exact = [p.astype(np.float32) for p in params]
    ref = gpuadam.Adam(exact, lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
    for g in grads:
        opt.step(g)
        ref.step([x.astype(np.float32) for x in g])
    for p, e, s in zip(params, exact, opt.state):
        np.testing.assert_array_equal(s["master"].reshape(e.shape), e)  # the float32 trajectory
        np.testing.assert_array_equal(p.view(np.uint16), e.astype(dtype).view(np.uint16))  # rounded to nearest even
        assert s["exp_avg"].dtype == np.float32


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_state_is_float32_math_rounded_each_step(dtype):
    params, grads = _half_problem(41, dtype)
    opt = gpuadam.Adam(params, lr=1e-2, amsgrad=True)
    emu = [p.copy() for p in params]
    state = [{n: np.zeros(p.size, dtype) for n in ("m", "v", "vmax")} for p in params]
    for t, g in enumerate(grads, start=1):
        opt.step(g)
        c = opt._hyper(opt.param_groups[0], 0).constants(t, np.float32)
        for p, x, s in zip(emu, g, state):
            a = [y.reshape(-1).astype(np.float32) for y in (p, x, s["m"], s["v"], s["vmax"])]
            numba_cpu.KERNELS["amsgrad"](*a, c)
            p.reshape(-1)[...] = a[0].astype(dtype)
            s["m"][...], s["v"][...], s["vmax"][...] = (y.astype(dtype) for y in a[2:])
    for p, e, st, s in zip(params, emu, opt.state, state):
        np.testing.assert_array_equal(p.view(np.uint16), e.view(np.uint16))
        np.testing.assert_array_equal(st["exp_avg_sq"].view(np.uint16), s["v"].view(np.uint16))
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == dtype


def test_stochastic_rounding_is_reproducible_and_unbiased():
    bf16 = ml_dtypes.bfloat16
    n = 200_000
    # an update far below one bfloat16 ulp of 1.0 (2**-7): rounding to nearest never moves p
    lr = 2.0**-12
    results = {}
    for name, kw in {"rne": {}, "sr": {"stochastic_rounding": True, "seed": 5},
                     "sr_again": {"stochastic_rounding": True, "seed": 5},
                     "sr_other": {"stochastic_rounding": True, "seed": 6}}.items():
        p = np.ones(n, bf16)
        opt = gpuadam.Adam([p], lr=lr, betas=(0.0, 0.0), **kw)  # step = lr * sign(g) exactly
        for _ in range(8):
            opt.step([np.ones(n, bf16)])
        results[name] = p.astype(np.float64)
    assert np.all(results["rne"] == 1.0)
    np.testing.assert_array_equal(results["sr"], results["sr_again"])
    assert not np.array_equal(results["sr"], results["sr_other"])
    # 8 steps of 2**-12 from 1.0: the mean lands on 1 - 2**-9 within sampling error
    assert results["sr"].mean() == pytest.approx(1.0 - 8 * lr, abs=2e-5)


@pytest.mark.parametrize("kw,match", [
    ({"master_weights": True}, "master_weights is for float16/bfloat16"),
    ({"stochastic_rounding": True}, "stochastic_rounding is for bfloat16"),
    ({"stochastic_rounding": True, "capturable": True}, "same random bits every step"),
])
def test_precision_options_refused_where_they_mean_nothing(kw, match):
    with pytest.raises(ValueError, match=match):
        gpuadam.Adam([np.zeros(3, np.float32)], **kw)


def test_uint16_storage_declared_as_bfloat16():
    bf16 = ml_dtypes.bfloat16
    params, grads = _half_problem(42, bf16, steps=3)
    raw = [p.view(np.uint16).copy() for p in params]
    a = gpuadam.Adam(params, master_weights=True)
    b = gpuadam.Adam(raw, master_weights=True, half_format="bfloat16")
    for g in grads:
        a.step(g)
        b.step([x.view(np.uint16) for x in g])
    for x, y in zip(params, raw):
        np.testing.assert_array_equal(x.view(np.uint16), y)


def test_half_checkpoint_roundtrip_and_flat_buffer(tmp_path):
    params, grads = _half_problem(43, np.float16, steps=6)
    buf = gpuadam.FlatBuffer.from_arrays(params)
    gbuf = buf.zeros_like()
    opt = gpuadam.Adam(buf.views, master_weights=True, amsgrad=True)
    straight = [p.copy() for p in params]
    ref = gpuadam.Adam(straight, master_weights=True, amsgrad=True)
    for t, g in enumerate(grads):
        for v, x in zip(gbuf.views, g):
            v[...] = x
        opt.step(gbuf.views)
        assert opt.last_step_launches == 1
        ref.step(g)
        if t == 2:
            opt.save(tmp_path / "half.ckpt")
            ref_state = ref.state_dict()
    for v, p in zip(buf.views, straight):
        np.testing.assert_array_equal(v, p)
    again = gpuadam.Adam([p.copy() for p in params], master_weights=True, amsgrad=True)
    again.load(tmp_path / "half.ckpt")
    for i in ref_state["state"]:
        for k, value in ref_state["state"][i].items():
            np.testing.assert_array_equal(again.state_dict()["state"][i][k], value)


def test_clipping_and_skip_with_half_grads():
    params, grads = _half_problem(44, np.float16, steps=3)
    opt = gpuadam.Adam(params, master_weights=True, skip_nonfinite=True)
    exact = [p.astype(np.float32) for p in params]
    ref = gpuadam.Adam(exact)
    bad = [g.copy() for g in grads[1]]
    bad[0].flat[3] = np.inf
    for g in (grads[0], bad, grads[2]):
        opt.step(g, max_grad_norm=10.0)
    for g in (grads[0], grads[2]):
        ref.step([x.astype(np.float32) for x in g], max_grad_norm=10.0)
    assert opt.steps_skipped == 1
    for p, e in zip(params, exact):
        np.testing.assert_array_equal(p, e.astype(np.float16))


def test_half_state_checkpoint_keeps_its_dtype(tmp_path):
    bf16 = ml_dtypes.bfloat16
    params, grads = _half_problem(45, bf16, steps=4)
    a = [p.copy() for p in params]
    opt = gpuadam.Adam(a, stochastic_rounding=True, seed=3)
    for g in grads[:2]:
        opt.step(g)
    opt.save(tmp_path / "bf16.ckpt")
    b = [p.copy() for p in a]
    again = gpuadam.Adam(b, stochastic_rounding=True, seed=3)
    again.load(tmp_path / "bf16.ckpt")
    for g in grads[2:]:  # a resumed stochastic run draws the same bits as the uninterrupted one
        opt.step(g)
        again.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
    assert again.state_dict()["state"][0]["exp_avg"].dtype == bf16
    for s, t in zip(opt.state_dict()["state"].values(), again.state_dict()["state"].values()):
        for k in s:
            np.testing.assert_array_equal(np.asarray(s[k]).view(np.uint16) if k != "step" else s[k],
                                          np.asarray(t[k]).view(np.uint16) if k != "step" else t[k])


@pytest.mark.parametrize("name,kw", [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("Adagrad", {"initial_accumulator_value": 0.1}),
    ("NAdam", {}),
    ("RAdam", {"weight_decay": 0.01}),
])
def test_every_optimizer_takes_master_weights(name, kw):
    bf16 = ml_dtypes.bfloat16
    params, grads = _half_problem(46, bf16, steps=7)
    opt = getattr(gpuadam, name)(params, master_weights=True, **kw)
    exact = [p.astype(np.float32) for p in params]
    ref = getattr(gpuadam, name)(exact, **kw)
    for g in grads:
        opt.step(g)
        ref.step([x.astype(np.float32) for x in g])
    for p, e, s in zip(params, exact, opt.state):
        np.testing.assert_array_equal(s["master"].reshape(e.shape), e)
        np.testing.assert_array_equal(p.view(np.uint16), e.astype(bf16).view(np.uint16))
