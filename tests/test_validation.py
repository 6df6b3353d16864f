"""Bad input gets a clear error naming the tensor, and a refused step changes nothing."""

import numpy as np
import pytest

import gpuadam


def _setup():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    opt = gpuadam.Adam(params, amsgrad=True)
    opt.step([np.ones((4, 3), np.float32), np.ones(5, np.float32)])
    return params, opt


def _snapshot(params, opt):
    return [p.copy() for p in params], [{k: v.copy() for k, v in s.items()} for s in opt.state], list(opt.steps)


def _unchanged(params, opt, snap):
    before_p, before_s, before_steps = snap
    for p, q in zip(params, before_p):
        np.testing.assert_array_equal(p, q)
    for s, t in zip(opt.state, before_s):
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])
    assert opt.steps == before_steps


good = [np.ones((4, 3), np.float32), np.ones(5, np.float32)]
BAD_GRADS = [
    ([good[0]], ValueError, "expected 2 arrays"),
    ([good[0], np.ones(6, np.float32)], ValueError, r"grad 1: expected shape \(5,\)"),
    ([good[0], np.ones(5, np.float64)], TypeError, "grad 1: expected dtype float32"),
    ([good[0], None], TypeError, "grad 1: expected an array"),
    ([good[0], [1.0] * 5], TypeError, "grad 1: expected an array"),
    ([np.ones((3, 4), np.float32).T, good[1]], ValueError, "grad 0: expected a C-contiguous"),
    (None, TypeError, "grads: expected a sequence"),
    (good[1], TypeError, "grads: expected a sequence"),
]


@pytest.mark.parametrize("grads,exc,match", BAD_GRADS)
def test_bad_grads_refused_and_nothing_changes(grads, exc, match):
    params, opt = _setup()
    snap = _snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    _unchanged(params, opt, snap)


BAD_HYPER = [
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"betas": (1.0, 0.999)}, ValueError, "beta1"),
    ({"betas": (0.9, -0.1)}, ValueError, "beta2"),
    ({"betas": 0.9}, ValueError, "betas"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"amsgrad": "yes"}, TypeError, "amsgrad"),
    ({"lr": "0.1"}, TypeError, "lr"),
]


@pytest.mark.parametrize("kw,exc,match", BAD_HYPER)
def test_bad_hyperparameters_refused_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        gpuadam.Adam([np.zeros(3, np.float32)], **kw)


@pytest.mark.parametrize("kw,exc,match", BAD_HYPER)
def test_bad_hyperparameter_set_mid_run_refused_before_any_update(kw, exc, match):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    opt = gpuadam.Adam([{"params": [params[0]]}, {"params": [params[1]]}])
    opt.step([np.ones(5, np.float32)] * 2)
    snap = _snapshot(params, opt)
    opt.param_groups[1].update(kw)  # the second group is bad: the first must not move either
    with pytest.raises(exc, match=f"param group 1: .*{match}"):
        opt.step([np.ones(5, np.float32)] * 2)
    _unchanged(params, opt, snap)


BAD_PARAMS = [
    ([np.zeros(3, np.int32)], TypeError, "param 0: expected dtype float32, float64, float16 or bfloat16, got int32"),
    ([np.zeros(3, np.uint16)], TypeError, "uint16/int16 storage needs half_format"),
    ([np.zeros(3, np.float32), np.zeros((3, 4), np.float32)[:, 1]], ValueError, "param 1: expected a C-contiguous"),
    ([None], TypeError, "param 0: expected a NumPy array"),
    ([], ValueError, "at least one"),
    (np.zeros(3, np.float32), TypeError, "single array"),
]


@pytest.mark.parametrize("params,exc,match", BAD_PARAMS)
def test_bad_params_refused(params, exc, match):
    with pytest.raises(exc, match=match):
        gpuadam.Adam(params)


def test_read_only_param_refused():
    p = np.zeros(3, np.float32)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="param 0: expected a writeable array"):
        gpuadam.Adam([p])


def test_functional_refuses_mismatched_state_and_writes_nothing():
    p = np.ones(4, np.float32)
    g = np.ones(4, np.float32)
    m = np.zeros(4, np.float32)
    v = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"exp_avg_sq 0: expected shape \(4,\)"):
        gpuadam.adam_step(p, g, m, v, step=1)
    np.testing.assert_array_equal(p, 1.0)
    np.testing.assert_array_equal(m, 0.0)
    with pytest.raises(ValueError, match="step"):
        gpuadam.adam_step(p, g, m, np.zeros(4, np.float32), step=0)


def test_load_state_dict_refuses_misfits_and_changes_nothing():
    params, opt = _setup()
    good_sd = opt.state_dict()
    opt.step(good)  # now the optimizer differs from good_sd
    snap = _snapshot(params, opt)
    groups_before = [dict(g) for g in opt.param_groups]

    def broken(edit):
        sd = opt.state_dict()
        sd = {**good_sd, "state": {k: dict(v) for k, v in good_sd["state"].items()},
              "param_groups": [dict(g) for g in good_sd["param_groups"]]}
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd.update(optimizer="SGD"), "saved by SGD, this optimizer is Adam"),
        (lambda sd: sd["state"].pop(1), "state for 2 params"),
        (lambda sd: sd["state"][1].update(exp_avg=np.zeros(6, np.float32)),
         r"param 1: state 'exp_avg' has shape \(6,\), the param's shape is \(5,\)"),
        (lambda sd: sd["state"][0].update(exp_avg=np.zeros((4, 3), np.float64)),
         "param 0: state 'exp_avg' has dtype float64, this optimizer's is float32"),
        (lambda sd: sd["state"][0].pop("max_exp_avg_sq"),
         r"param 0: it holds state \['exp_avg', 'exp_avg_sq'\], this optimizer allocated"),
        (lambda sd: sd["state"][0].update(step=-1), "integer step"),
        (lambda sd: sd["param_groups"][0].update(lr=-1.0), "param group 0: lr"),
        (lambda sd: sd["param_groups"][0].update(params=[0]), "param group 0 expected params"),
        (lambda sd: sd["param_groups"].append({}),
         r"it has 2 param groups of sizes \[2, '\?'\], this optimizer has 1 of sizes \[2\]"),
    ]
    for edit, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            opt.load_state_dict(broken(edit))
        _unchanged(params, opt, snap)
        assert opt.param_groups == groups_before


def test_load_state_dict_with_other_amsgrad_is_refused_before_any_copy():
    params, opt = _setup()  # built with amsgrad=True
    plain = gpuadam.Adam([p.copy() for p in params])
    plain.step(good)
    snap = _snapshot(params, opt)
    with pytest.raises(ValueError, match=r"holds state \['exp_avg', 'exp_avg_sq'\] .*allocated "
                                         r"\['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'\] \(construct it"):
        opt.load_state_dict(plain.state_dict())
    _unchanged(params, opt, snap)
    snap_plain = _snapshot(plain._params, plain)
    with pytest.raises(ValueError, match=r"holds state \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'\] .*allocated "
                                         r"\['exp_avg', 'exp_avg_sq'\] \(construct it with the same flags"):
        plain.load_state_dict(opt.state_dict())
    _unchanged(plain._params, plain, snap_plain)


def test_save_and_load_methods_round_trip(tmp_path):
    params, opt = _setup()
    opt.save(tmp_path / "opt.ckpt")
    before = _snapshot(params, opt)
    opt.step(good)
    opt.load(tmp_path / "opt.ckpt")
    assert opt.steps == before[2]
    for s, t in zip(opt.state, before[1]):
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])
