"""Trust in what the optimizer holds: hyperparameters edited in place are seen (and checked) by the
next step, ``state_dict`` shares nothing with the optimizer, and malformed input anywhere gets a
clear error naming the thing instead of a traceback from deep inside."""

import numpy as np
import pytest
from helpers import problem

import gpuadam
from gpuadam import backends, checkpoint
from gpuadam.backends import BackendStatus, BackendUnavailable
from gpuadam.flat import FlatBuffer

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


# --- item 10: clear errors ----------------------------------------------------------------------


def _stepped():
    params0, grads = problem(2, shapes=SHAPES, steps=2)
    params = [p.copy() for p in params0]
    opt = gpuadam.Adam(params, amsgrad=True, backend="numba-cpu")
    opt.step(grads[0])
    return params, opt, grads[1]


@pytest.mark.parametrize("kind", ["dict", "set"])
def test_grads_as_a_dict_or_a_set_are_refused(kind):
    params, opt, grads = _stepped()
    snap = _snapshot(params, opt)
    bad = dict(enumerate(grads)) if kind == "dict" else {g.tobytes() for g in grads}
    with pytest.raises(TypeError, match=f"grads: expected a sequence of 2 arrays aligned .*, got a {kind}"):
        opt.step(bad)
    _assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("lr", [np.array([1e-3, 2e-3]), np.array([1e-3]), np.array([[1e-3]])])
def test_lr_array_of_values_is_refused(lr):
    params, opt, grads = _stepped()
    snap = _snapshot(params, opt)
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(TypeError, match=r"param group 0: lr must be a real number, got an array of shape"):
        opt.step(grads)
    _assert_unchanged(params, opt, snap)


def test_zero_d_array_and_numpy_scalar_lr_step_like_a_float(tmp_path):
    for lr in (np.array(1e-2), np.array(1e-2, np.float32), np.float32(1e-2), np.float64(1e-2)):
        (a, opt_a), (b, opt_b), grads = _pair()
        opt_a.param_groups[0]["lr"] = lr
        opt_b.param_groups[0]["lr"] = float(lr)
        opt_a.step(grads[0])
        opt_b.step(grads[0])
        _assert_same_params(a, b)
    opt_a.param_groups[0]["lr"] = np.array(1e-2)
    opt_a.save(tmp_path / "c")  # and a checkpoint stores the number a 0-d array holds
    opt_b.param_groups[0]["lr"] = 0.5
    opt_b.load(tmp_path / "c")
    assert opt_b.param_groups[0]["lr"] == 1e-2
    with pytest.raises(TypeError, match="lr must be a real number"):  # a 0-d bool is no number
        gpuadam.Adam([np.zeros(3, np.float32)], lr=np.array(True))


def _load_refused(edit, exc, match):
    params, opt, grads = _stepped()
    sd = opt.state_dict()
    opt.step(grads)
    snap = _snapshot(params, opt)
    groups = [dict(g) for g in opt.param_groups]
    edit(sd)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(params, opt, snap)
    assert opt.param_groups == groups


LOAD_CASES = {
    "group-none": (lambda sd: sd.update(param_groups=[None]), "state_dict: param group 0: expected a dict"),
    "group-params-int": (lambda sd: sd["param_groups"][0].update(params=3), "param group 0 expected params"),
    "group-params-arrays": (
        lambda sd: sd["param_groups"][0].update(params=[np.arange(2), 1]), "param group 0 expected params"
    ),
    "string-keys": (
        lambda sd: sd.update(state={str(k): v for k, v in sd["state"].items()}),
        r"state_dict: expected state keyed by the param indices 0..1 as integers, got keys \['0', '1'\]",
    ),
    "other-keys": (
        lambda sd: sd.update(state={k + 1: v for k, v in sd["state"].items()}), "keyed by the param indices 0..1"
    ),
    "step-2**70": (lambda sd: sd["state"][1].update(step=2**70), r"param 1: expected an integer step in \[0, 2\*\*63"),
    "step-2**63": (lambda sd: sd["state"][1].update(step=2**63), r"param 1: expected an integer step in \[0, 2\*\*63"),
    "skipped-negative": (lambda sd: sd.update(steps_skipped=-1), "steps_skipped must be an integer"),
    "skipped-str": (lambda sd: sd.update(steps_skipped="1"), "steps_skipped must be an integer"),
    "counter-huge": (lambda sd: sd.update(rounding_counter=2**64), "rounding_counter must be an integer"),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_malformed_state_dict_is_refused_and_changes_nothing(case):
    edit, match = LOAD_CASES[case]
    _load_refused(edit, ValueError, match)


def test_numpy_integer_steps_are_accepted_up_to_the_int64_bound_by_load_and_save(tmp_path):
    params, opt, grads = _stepped()
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = np.int64(2**63 - 1)
    opt.load_state_dict(sd)
    assert opt.steps == [2**63 - 1] * 2
    opt.save(tmp_path / "c")  # the bound load_state_dict accepts, save accepts
    fresh = gpuadam.Adam([p.copy() for p in params], amsgrad=True, backend="numba-cpu")
    fresh.load(tmp_path / "c")
    assert fresh.steps == [2**63 - 1] * 2
    opt._steps[0] = 2**63  # what neither accepts: the save refuses it before touching the disk
    with pytest.raises(ValueError, match=r"param 0: cannot save: step must be an integer in \[0, 2\*\*63 - 1\]"):
        checkpoint.save(opt, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_flat_buffer_from_no_arrays_is_refused():
    with pytest.raises(ValueError, match="arrays: expected at least one array, got an empty list"):
        FlatBuffer.from_arrays([])
    with pytest.raises(TypeError, match="arrays: expected a list of arrays, got ndarray"):
        FlatBuffer.from_arrays(np.zeros(3, np.float32))


def test_flat_buffer_from_a_generator_copies_every_array():
    arrays = [np.full(3, 1.0, np.float32), np.full(2, 2.0, np.float32)]
    buf = FlatBuffer.from_arrays(a for a in arrays)
    for view, a in zip(buf.views, arrays, strict=True):
        np.testing.assert_array_equal(view, a)


BAD_SHAPES = {
    "float-extent": ([(2.7, 3)], TypeError, "shapes: tensor 0: expected integer extents, got float 2.7"),
    "float-size": ([3, 4.0], TypeError, "shapes: tensor 1: expected a shape .* got float 4.0"),
    "string": (["12"], TypeError, "shapes: tensor 0: expected a shape .* got str '12'"),
    "bool-extent": ([(True, 3)], TypeError, "shapes: tensor 0: expected integer extents, got bool True"),
    "negative": ([(3,), (2, -1)], ValueError, "shapes: tensor 1: expected extents >= 0, got -1"),
    "not-a-list": ("12", TypeError, "shapes: expected a list of shapes, got str"),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
def test_flat_buffer_refuses_what_is_not_a_shape(case):
    shapes, exc, match = BAD_SHAPES[case]
    with pytest.raises(exc, match=match):
        FlatBuffer(shapes)


def test_flat_buffer_takes_python_and_numpy_integers():
    buf = FlatBuffer([(np.int64(2), 3), np.int32(4), 5, np.array([1, 2]), []])
    assert buf.shapes == [(2, 3), (4,), (5,), (1, 2), ()]
    assert all(type(x) is int for s in buf.shapes for x in s)


def test_flat_buffer_on_cuda_without_a_usable_device_says_why_in_one_line(monkeypatch):
    reason = "no usable CUDA device (CudaSupportError: Error at driver init: CUDA driver library cannot be found.)"
    monkeypatch.setitem(backends._statuses, "numba-cuda", BackendStatus("numba-cuda", False, reason))
    monkeypatch.setitem(backends._statuses, "cupy", BackendStatus("cupy", False, "no CUDA device found"))
    with pytest.raises(BackendUnavailable) as info:
        FlatBuffer([(3,)], device="cuda")
    assert str(info.value) == (f"FlatBuffer(device='cuda'): no GPU backend can run here (numba-cuda: {reason}; "
                               "cupy: no CUDA device found)")


def test_flat_buffer_on_cuda_here_gives_the_probe_reason():
    statuses = [backends.status(name) for name in ("numba-cuda", "cupy")]
    if any(status.available for status in statuses):
        pytest.skip("a GPU backend runs here")
    with pytest.raises(BackendUnavailable, match="FlatBuffer\\(device='cuda'\\): no GPU backend can run here") as info:
        FlatBuffer([(3,)], device="cuda")
    assert "\n" not in str(info.value) and all(status.reason in str(info.value) for status in statuses)


def test_adam_step_takes_numpy_integer_steps_and_refuses_bools():
    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(6), rng.standard_normal(6)
    out = []
    for step in (2, np.int64(2), np.int32(2), np.uint8(2)):
        p, m, v = p0.copy(), np.zeros(6), np.zeros(6)
        gpuadam.adam_step(p, g, m, v, step=step, backend="numba-cpu")
        out.append(p)
    for p in out[1:]:
        np.testing.assert_array_equal(p, out[0])
    p, m, v = p0.copy(), np.zeros(6), np.zeros(6)
    for step, exc, match in [(True, TypeError, "step must be an integer, got bool"),
                             (np.bool_(True), TypeError, "step must be an integer, got bool"),
                             (2.0, TypeError, "step must be an integer, got float"),
                             (0, ValueError, r"step must be an integer in \[1, 2\*\*63 - 1\]"),
                             (2**63, ValueError, r"step must be an integer in \[1, 2\*\*63 - 1\]")]:
        with pytest.raises(exc, match=match):
            gpuadam.adam_step(p, g, m, v, step=step, backend="numba-cpu")
    np.testing.assert_array_equal(p, p0)
    assert not m.any() and not v.any()
