"""Trust in what the optimizer holds: hyperparameters edited in place are seen (and checked) by the
next step, and ``state_dict`` shares nothing with the optimizer."""

import numpy as np
import pytest
from helpers import problem

import gpuadam

SHAPES = [(4, 3), (5,)]


def _pair(seed=0, **kw):
    """Two optimizers over equal copies of the same params, and the gradients to step them with."""
    params0, grads = problem(seed, shapes=SHAPES, steps=3)
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    return (a, gpuadam.Adam(a, backend="numba-cpu", **kw)), (b, gpuadam.Adam(b, backend="numba-cpu", **kw)), grads


def _snapshot(params, opt):
    return ([p.copy() for p in params], [{k: v.copy() for k, v in s.items()} for s in opt.state], list(opt.steps))


def _assert_unchanged(params, opt, snap):
    for p, q in zip(params, snap[0], strict=True):
        np.testing.assert_array_equal(p, q)
    for s, t in zip(opt.state, snap[1], strict=True):
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])
    assert opt.steps == snap[2]


def _assert_same_params(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# --- item 2: hyperparameters changed in place ---------------------------------------------------


def test_betas_list_edited_in_place_is_used_by_the_next_step():
    (a, opt_a), (b, opt_b), grads = _pair(betas=[0.9, 0.999])
    (c, opt_c), _, _ = _pair(betas=[0.9, 0.999])
    for opt in (opt_a, opt_b, opt_c):
        opt.step(grads[0])
    opt_a.param_groups[0]["betas"][0] = 0.5  # the same list object, edited
    opt_b.param_groups[0]["betas"] = (0.5, 0.999)  # a new value: the reference
    for g in grads[1:]:
        for opt in (opt_a, opt_b, opt_c):
            opt.step(g)
    _assert_same_params(a, b)
    assert not np.array_equal(a[0], c[0])  # the edit did change the trajectory


def test_lr_array_edited_in_place_is_used_by_the_next_step():
    (a, opt_a), (b, opt_b), grads = _pair()
    opt_a.param_groups[0]["lr"] = np.array(1e-3)  # a 0-d array is a number
    opt_a.step(grads[0])
    opt_b.step(grads[0])
    _assert_same_params(a, b)
    opt_a.param_groups[0]["lr"][...] = 0.25
    opt_b.param_groups[0]["lr"] = 0.25
    opt_a.step(grads[1])
    opt_b.step(grads[1])
    _assert_same_params(a, b)


@pytest.mark.parametrize("group", [0, 1])
def test_bad_value_written_in_place_is_refused_before_anything_changes(group):
    params0, grads = problem(1, shapes=SHAPES, steps=2)
    params = [p.copy() for p in params0]
    betas = [[0.9, 0.999], [0.8, 0.99]]
    opt = gpuadam.Adam([{"params": [params[0]], "betas": betas[0]}, {"params": [params[1]], "betas": betas[1]}])
    opt.step(grads[0])
    snap = _snapshot(params, opt)
    opt.param_groups[group]["betas"][1] = 7.0
    with pytest.raises(ValueError, match=fr"param group {group}: beta2 must be in \[0, 1\), got 7.0"):
        opt.step(grads[1])
    _assert_unchanged(params, opt, snap)


def test_groups_and_caller_do_not_share_lists():
    betas = [0.9, 0.999]
    params = [np.zeros(3, np.float32), np.zeros(3, np.float32)]
    opt = gpuadam.Adam([{"params": params[:1]}, {"params": params[1:], "betas": betas}], betas=betas)
    opt.param_groups[0]["betas"][0] = 0.5
    assert opt.param_groups[1]["betas"] == [0.9, 0.999]
    assert opt.defaults["betas"] == [0.9, 0.999]
    betas[1] = 7.0  # the caller's list, edited after construction
    assert opt.param_groups[1]["betas"] == [0.9, 0.999]


def test_state_dict_is_a_deep_copy():
    (a, opt_a), (b, opt_b), grads = _pair(betas=[0.9, 0.999])
    opt_a.param_groups[0]["lr"] = np.array(1e-3)
    opt_b.param_groups[0]["lr"] = np.array(1e-3)
    opt_a.step(grads[0])
    opt_b.step(grads[0])
    sd = opt_a.state_dict()
    sd["param_groups"][0]["betas"][0] = 0.5
    sd["param_groups"][0]["lr"][...] = 0.5
    sd["state"][0]["exp_avg"][...] = 99.0
    assert opt_a.param_groups[0]["betas"] == [0.9, 0.999] and opt_a.param_groups[0]["lr"] == 1e-3
    for g in grads[1:]:
        opt_a.step(g)
        opt_b.step(g)
    _assert_same_params(a, b)


def test_load_state_dict_copies_in():
    (a, opt_a), (b, opt_b), grads = _pair(betas=[0.9, 0.999])
    opt_a.step(grads[0])
    opt_b.step(grads[0])
    sd = opt_b.state_dict()
    opt_a.load_state_dict(sd)
    sd["param_groups"][0]["betas"][0] = 0.5  # after loading: must change nothing
    sd["param_groups"][0]["betas"] = None
    assert opt_a.param_groups[0]["betas"] == [0.9, 0.999]
    for g in grads[1:]:
        opt_a.step(g)
        opt_b.step(g)
    _assert_same_params(a, b)
