"""The family's Numba CUDA kernels, run by the simulator on ``numba.cuda`` device arrays, against the
reference; and the device-side bookkeeping (capturable, skipping, clipping), which computes each
family's constants on the device with the host's own constants function."""

import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

sys.path.insert(0, str(Path(__file__).parent.parent))
from family_cases import CASES, case_id, describe, reference_run  # noqa: E402
from helpers import problem, trajectory_error  # noqa: E402

import gpuadam  # noqa: E402

# Two small tensors: in the simulator's small launches (conftest) the 300 loop over their grid stride.
SHAPES = [(300,), (2, 3)]
ONE = [(300,)]
STEPS = 3


def _device(arrays):
    return [cuda.to_device(a) for a in arrays]


def _check(name, kw, params, params0, grads, opt, dtype):
    hyper, _, names, _ = describe(name, kw)
    eps = np.finfo(dtype).eps
    for p, p0, (rp, rstate), state in zip(params, params0, reference_run(name, hyper, params0, grads), opt.state):
        got = p.copy_to_host()
        assert got.shape == p0.shape
        assert np.abs(rp - p0).max() > 0
        assert trajectory_error(got, rp, p0, STEPS) < 1.0
        assert set(state) == set(names)
        for n in names:
            r = rstate[n]
            assert np.abs(state[n].copy_to_host().reshape(p0.shape) - r).max() <= STEPS * 4 * eps * np.abs(r).max()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_device_arrays_follow_the_reference(case):
    name, kw = case
    params0, grads = problem(11, shapes=SHAPES, steps=STEPS)
    params = _device(params0)
    opt = getattr(gpuadam, name)(params, **kw)
    assert opt.backend == "numba-cuda"
    for g in grads:
        opt.step(_device(g))
    _check(name, kw, params, params0, grads, opt, np.float32)


def _one_case_per_rule():
    seen, out = set(), []
    for name, kw in CASES:
        rule = describe(name, kw)[1]
        if rule not in seen:
            seen.add(rule)
            out.append((name, kw))
    return out


@pytest.mark.parametrize("case", _one_case_per_rule(), ids=case_id)
def test_float64_kernels_follow_the_reference(case):
    name, kw = case
    params0, grads = problem(12, shapes=SHAPES, dtype=np.float64, steps=STEPS)
    params = _device(params0)
    opt = getattr(gpuadam, name)(params, **kw)
    for g in grads:
        opt.step(_device(g))
    _check(name, kw, params, params0, grads, opt, np.float64)


MACHINERY = [("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
             ("RMSprop", {"centered": True, "momentum": 0.9}),
             ("Adagrad", {"initial_accumulator_value": 0.5, "lr_decay": 0.1}),
             ("Adamax", {"weight_decay": 0.01}),
             ("NAdam", {"weight_decay": 0.01, "decoupled_weight_decay": True}),
             ("RAdam", {"betas": (0.9, 0.9)})]  # rho_t > 5 from step 6: the steps below cross it


def _run(name, kw, grads_seq, params0, options=None, step_kw=None, poison_at=None):
    params = _device(params0)
    opt = getattr(gpuadam, name)(params, **kw, **(options or {}))
    for t, g in enumerate(grads_seq):
        dev = _device(g)
        if t == poison_at:
            bad = g[0].copy()
            bad.flat[0] = np.nan
            dev[0] = cuda.to_device(bad)
        opt.step(dev, **(step_kw or {}))
    return opt, [p.copy_to_host() for p in params]


@pytest.mark.parametrize("case", MACHINERY, ids=case_id)
def test_capturable_equals_default_mode_bit_for_bit(case):
    """The device computes the step's constants with the family's constants function (NAdam's
    product of mu, RAdam's rectification, Adagrad's lr decay, SGD's first step) as the host does."""
    name, kw = case
    params0, grads = problem(14, shapes=ONE, steps=7)
    _, default = _run(name, kw, grads, params0)
    opt, captured = _run(name, kw, grads, params0, {"capturable": True})
    assert opt.steps == [7]
    for a, b in zip(default, captured):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", [MACHINERY[i] for i in (0, 2, 4)], ids=case_id)
def test_skip_and_clip_on_device_match_the_cpu_backend(case):
    name, kw = case
    params0, grads = problem(16, shapes=ONE, steps=3)
    opt, on_device = _run(name, kw, grads, params0, {"skip_nonfinite": True}, {"max_grad_norm": 2.0}, poison_at=0)
    assert opt.steps_skipped == 1 and opt.steps == [2]
    host = [p.copy() for p in params0]
    ref = getattr(gpuadam, name)(host, **kw, backend="numba-cpu")
    for g in grads[1:]:  # the skipped first step changes nothing: the next one is the first
        ref.step(g, max_grad_norm=2.0)
    for a, b in zip(on_device, host):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", MACHINERY, ids=case_id)
def test_flat_buffer_on_device_steps_in_one_launch(case):
    name, kw = case
    params0, grads = problem(13, shapes=SHAPES, steps=3)
    pbuf = gpuadam.FlatBuffer.from_arrays(_device(params0))
    gbuf = pbuf.zeros_like()
    opt = getattr(gpuadam, name)(pbuf.views, **kw)
    host = [p.copy() for p in params0]
    ref = getattr(gpuadam, name)(host, **kw, backend="numba-cpu")
    for g in grads:
        for view, x in zip(gbuf.views, g):
            view.copy_to_device(x)
        opt.step(gbuf.views)
        assert opt.last_step_launches == 1
        ref.step(g)
    for v, h in zip(pbuf.views, host):
        np.testing.assert_allclose(v.copy_to_host(), h, rtol=1e-6, atol=1e-7)
    for s, t in zip(opt.state, ref.state):
        assert set(s) == set(t)
        for n in s:
            np.testing.assert_allclose(s[n].copy_to_host(), t[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", MACHINERY[:3], ids=case_id)
def test_state_dict_roundtrip_on_device_is_bit_identical(case):
    name, kw = case
    params0, grads = problem(15, shapes=SHAPES, steps=4)
    _, straight = _run(name, kw, grads, params0)
    b = _device(params0)
    first = getattr(gpuadam, name)(b, **kw)
    for g in grads[:2]:
        first.step(_device(g))
    second = getattr(gpuadam, name)(b, **kw)
    second.load_state_dict(first.state_dict())
    for g in grads[2:]:
        second.step(_device(g))
    for x, y in zip(straight, b):
        np.testing.assert_array_equal(x, y.copy_to_host())
