"""Global-norm clipping, loss scaling and skipping non-finite steps, on the CPU backend."""

import numpy as np
import pytest
from helpers import problem, trajectory_error

import gpuadam


def _clipped(grads, max_norm):
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    factor = min(1.0, max_norm / (norm + 1e-6))
    return [(g * factor).astype(g.dtype) for g in grads], norm


def test_clipping_equals_clip_then_step():
    params0, grads = problem(30, steps=10)
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    opt_a = gpuadam.Adam(a, amsgrad=True)
    opt_b = gpuadam.Adam(b, amsgrad=True)
    for g in grads:
        opt_a.step(g, max_grad_norm=5.0)
        clipped, norm = _clipped(g, 5.0)
        assert norm > 5.0  # the clip is active in this problem
        assert opt_a.last_grad_norm == pytest.approx(norm, rel=1e-12)
        opt_b.step(clipped)
    for x, y, p0 in zip(a, b, params0):
        assert trajectory_error(x, y.astype(np.float64), p0, 10) < 1.0


def test_norm_is_of_the_unscaled_gradients():
    params0, grads = problem(31, steps=3)
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    opt_a = gpuadam.Adam(a)
    opt_b = gpuadam.Adam(b)
    for g in grads:
        opt_a.step([x * np.float32(256) for x in g], grad_scale=256.0, max_grad_norm=5.0)
        opt_b.step(g, max_grad_norm=5.0)
        assert opt_a.last_grad_norm == pytest.approx(opt_b.last_grad_norm, rel=1e-6)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_step_changes_nothing(bad):
    params0, grads = problem(32, steps=4)
    params = [p.copy() for p in params0]
    opt = gpuadam.Adam(params, skip_nonfinite=True)
    opt.step(grads[0])
    before = [p.copy() for p in params], [{k: v.copy() for k, v in s.items()} for s in opt.state], opt.steps
    poisoned = [g.copy() for g in grads[1]]
    poisoned[2].flat[0] = bad
    opt.step(poisoned)
    assert opt.steps_skipped == 1 and opt.last_step_launches == 0
    for p, q in zip(params, before[0]):
        np.testing.assert_array_equal(p, q)
    for s, t in zip(opt.state, before[1]):
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])
    assert opt.steps == before[2]
    # and the run goes on as if the bad step never happened
    ref = [p.copy() for p in params0]
    ref_opt = gpuadam.Adam(ref)
    ref_opt.step(grads[0])
    opt.step(grads[2])
    ref_opt.step(grads[2])
    for x, y in zip(params, ref):
        np.testing.assert_array_equal(x, y)


def test_without_skip_nonfinite_the_nan_goes_through_like_torch():
    params = [np.ones(3, np.float32)]
    opt = gpuadam.Adam(params)
    opt.step([np.array([1.0, np.nan, 1.0], np.float32)])
    assert np.isnan(params[0][1]) and np.isfinite(params[0][0])


def test_bad_clip_and_capturable_on_host_are_refused():
    opt = gpuadam.Adam([np.ones(3, np.float32)])
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="max_grad_norm"):
            opt.step([np.ones(3, np.float32)], max_grad_norm=bad)
    with pytest.raises(ValueError, match="capturable"):
        gpuadam.Adam([np.ones(3, np.float32)], capturable=True)


def test_clipping_matches_torch():
    torch = pytest.importorskip("torch")
    params0, grads = problem(33, steps=8)
    ours = [p.copy() for p in params0]
    opt = gpuadam.AdamW(ours, lr=1e-2)
    theirs = [torch.tensor(p.copy()) for p in params0]
    topt = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for g in grads:
        opt.step(g, max_grad_norm=3.0)
        for t, x in zip(theirs, g):
            t.grad = torch.tensor(x)
        norm = torch.nn.utils.clip_grad_norm_(theirs, 3.0)
        assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
        topt.step()
    for a, t, p0 in zip(ours, theirs, params0):
        assert trajectory_error(a, t.numpy().astype(np.float64), p0, 8) < 2.0
