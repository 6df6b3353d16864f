"""The GPU step paths keep every param's own step count, unscale before checking, and never read a
FlatBuffer's padding into a result: in the simulator, against the CPU backend."""

import numpy as np
import pytest
from numba import cuda

import gpuadam

SHAPES = [(33,), (5, 3), (1,), (40,)]
PADDED = [(3,), (17,), (5, 2)]


def _arrays(seed, shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def _load_steps(opt, steps):
    sd = opt.state_dict()
    for i, step in enumerate(steps):
        sd["state"][i]["step"] = step
    opt.load_state_dict(sd)


OPTIONS = [{}, {"skip_nonfinite": True}, {"capturable": True}, {"capturable": True, "skip_nonfinite": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "host-counts")
@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flatbuffer"])
def test_params_at_different_steps_in_one_group_match_the_cpu(options, flat):
    steps = [3, 7, 3, 1]
    warm = _arrays(1, SHAPES)
    grads = [_arrays(2 + t, SHAPES) for t in range(3)]
    host = _arrays(100, SHAPES)
    ref = gpuadam.Adam(host, lr=1e-2, backend="numba-cpu")
    if flat:
        buf = gpuadam.FlatBuffer.from_arrays([cuda.to_device(p) for p in _arrays(100, SHAPES)])
        params, gbuf = buf.views, buf.zeros_like()
    else:
        params = [cuda.to_device(p) for p in _arrays(100, SHAPES)]
    opt = gpuadam.Adam(params, lr=1e-2, **options)
    for o in (ref, opt):
        o.step([cuda.to_device(x) for x in warm] if o is opt else warm)
        _load_steps(o, steps)
    for g in grads:
        ref.step(g, max_grad_norm=0.5)
        if flat:
            for view, x in zip(gbuf.views, g):
                view.copy_to_device(x)
            opt.step(gbuf.views, max_grad_norm=0.5)
        else:
            opt.step([cuda.to_device(x) for x in g], max_grad_norm=0.5)
    assert opt.steps == [s + 3 for s in steps] == ref.steps
    for p, r in zip(params, host):
        np.testing.assert_allclose(p.copy_to_host(), r, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("options", OPTIONS[1:2] + OPTIONS[3:], ids=lambda o: ",".join(o))
def test_gradient_overflowing_once_unscaled_is_skipped_on_the_device(options):
    p = cuda.to_device(np.ones(8, np.float32))
    opt = gpuadam.Adam([p], **options)
    opt.step([cuda.to_device(np.full(8, 1e35, np.float32))], grad_scale=2.0**-20)
    assert opt.steps_skipped == 1 and opt.steps == [0]
    np.testing.assert_array_equal(p.copy_to_host(), 1.0)
    opt.step([cuda.to_device(np.full(8, 1e30, np.float32))], grad_scale=2.0**-20)
    assert opt.steps_skipped == 1 and opt.steps == [1]


def test_junk_in_device_gradient_padding_changes_neither_the_norm_nor_the_skip():
    buf = gpuadam.FlatBuffer.from_arrays([cuda.to_device(p) for p in _arrays(100, PADDED)])
    gbuf = buf.zeros_like()
    g = _arrays(3, PADDED)
    junk = np.zeros(gbuf.size, np.float32)
    for offset, x in zip(buf.offsets, g):
        junk[offset : offset + x.size] = x.reshape(-1)
    junk[3:16] = np.nan
    junk[-1] = 1e30
    gbuf.data.copy_to_device(junk)
    opt = gpuadam.Adam(buf.views, skip_nonfinite=True)
    opt.step(gbuf.views, max_grad_norm=1e9)
    expected = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
    assert opt.steps_skipped == 0 and opt.steps == [1] * len(PADDED)
    assert opt.last_grad_norm.copy_to_host()[0] == pytest.approx(expected, rel=1e-6)
    assert opt.last_step_launches == 1


def test_eps_zero_keeps_device_padding_zero():
    buf = gpuadam.FlatBuffer.from_arrays([cuda.to_device(p) for p in _arrays(100, PADDED)])
    gbuf = buf.zeros_like()
    opt = gpuadam.Adam(buf.views, eps=0.0, capturable=True)
    for t in range(2):
        for view, x in zip(gbuf.views, _arrays(10 + t, PADDED)):
            view.copy_to_device(x)
        opt.step(gbuf.views)
    data = buf.data.copy_to_host()
    padding = np.ones(buf.size, bool)
    for offset, view in zip(buf.offsets, buf.views):
        padding[offset : offset + view.size] = False
    np.testing.assert_array_equal(data[padding], 0.0)
    assert np.isfinite(data).all()


def test_device_gradient_aliasing_a_param_is_refused():
    p = cuda.to_device(np.ones(6, np.float32))
    opt = gpuadam.Adam([p])
    with pytest.raises(ValueError, match="grad 0 shares memory with param 0"):
        opt.step([p])
    np.testing.assert_array_equal(p.copy_to_host(), 1.0)
