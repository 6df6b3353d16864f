"""What a GPU step does besides the rule, on each GPU backend: clipping by the global norm and
skipping non-finite steps on the device, capturable steps, a FlatBuffer's one launch, and save,
load and continue of device state. Each against the CPU backend or bit for bit against itself."""

import numpy as np
import pytest
from family_cases import case_id, describe, reference_run
from gpukit import SHAPES, host, native, put_all
from helpers import problem, trajectory_error

import gpuadam
from gpuadam import checkpoint

# rules whose constants the device computes differently from Adam's: SGD's first step, RMSprop's
# centring, Adagrad's lr decay, NAdam's product of mu, RAdam's rectification (rho_t > 5 from step 6)
MACHINERY = [("Adam", {"amsgrad": True, "weight_decay": 0.01}),
             ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
             ("RMSprop", {"centered": True, "momentum": 0.9}),
             ("Adagrad", {"initial_accumulator_value": 0.5, "lr_decay": 0.1}),
             ("NAdam", {"weight_decay": 0.01, "decoupled_weight_decay": True}),
             ("RAdam", {"betas": (0.9, 0.9)}),
             ("Lion", {"lr": 1e-3, "weight_decay": 0.1})]


def _run(backend, name, kw, grads_seq, params0, options=None, step_kw=None, poison_at=None):
    kind = native(backend)
    params = put_all(params0, kind)
    opt = getattr(gpuadam, name)(params, backend=backend, **kw, **(options or {}))
    for t, g in enumerate(grads_seq):
        if t == poison_at:
            g = [x.copy() for x in g]
            g[0].flat[-1] = np.nan
        opt.step(put_all(g, kind), **(step_kw or {}))
    return opt, [host(p) for p in params]


def _reference(name, kw, grads_seq, params0, max_norm=None, grad_scale=1.0):
    """float64 ``(p, state)`` per tensor, each step's gradients unscaled and clipped on the host in
    float64 first (the kernels take both as a factor in their constants); and the last norm."""
    hyper = describe(name, kw)[0]
    clipped, norm = [], None
    for g in grads_seq:
        g = [x.astype(np.float64) / grad_scale for x in g]
        norm = float(np.sqrt(sum(np.sum(x * x) for x in g)))
        factor = min(1.0, max_norm / (norm + 1e-6)) if max_norm is not None else 1.0
        clipped.append([x * factor for x in g])
    return reference_run(name, hyper, params0, clipped), norm


def _close(got, reference, params0, steps):
    for i, (a, p0, (rp, _)) in enumerate(zip(got, params0, reference)):
        assert np.abs(rp - p0).max() > 0, "the reference did not move: the case proves nothing"
        err = trajectory_error(a, rp, p0, steps)
        assert err < 1.0, f"param {i}: {err:.3g}x the rounding budget from the float64 reference"


@pytest.mark.parametrize("case", MACHINERY, ids=case_id)
def test_capturable_equals_default_mode_bit_for_bit(backend, case):
    name, kw = case
    steps = 7 if name == "RAdam" else 3
    params0, grads = problem(14, shapes=SHAPES, steps=steps)
    _, default = _run(backend, name, kw, grads, params0)
    opt, captured = _run(backend, name, kw, grads, params0, {"capturable": True})
    assert opt.steps == [steps] * len(SHAPES)
    for i, (a, b) in enumerate(zip(default, captured)):
        np.testing.assert_array_equal(a, b, err_msg=f"param {i}")


@pytest.mark.parametrize("capturable", [False, True], ids=["host-counts", "capturable"])
@pytest.mark.parametrize("case", MACHINERY[:3], ids=case_id)
def test_clip_and_skip_on_the_device_match_the_cpu(backend, case, capturable):
    name, kw = case
    params0, grads = problem(16, shapes=SHAPES, steps=3)
    options = {"skip_nonfinite": True, "capturable": capturable}
    opt, got = _run(backend, name, kw, grads, params0, options, {"max_grad_norm": 2.0, "grad_scale": 4.0},
                    poison_at=1)
    assert opt.steps_skipped == 1 and opt.steps == [2] * len(SHAPES)
    reference, norm = _reference(name, kw, [grads[0], grads[2]], params0, max_norm=2.0, grad_scale=4.0)
    assert norm > 2.0, "the clip never bound: the case proves nothing"
    assert float(host(opt.last_grad_norm)[0]) == pytest.approx(norm, rel=1e-5)
    _close(got, reference, params0, 2)


@pytest.mark.parametrize("case", MACHINERY[:4], ids=case_id)
def test_flat_buffer_on_the_device_steps_in_one_launch(backend, case):
    name, kw = case
    params0, grads = problem(13, shapes=SHAPES, steps=3)
    pbuf = gpuadam.FlatBuffer.from_arrays(put_all(params0, "numba"))
    assert pbuf.device == "cuda"
    gbuf = pbuf.zeros_like()
    opt = getattr(gpuadam, name)(pbuf.views, backend=backend, **kw)
    for g in grads:
        for view, x in zip(gbuf.views, g):
            view.copy_to_device(x)
        opt.step(gbuf.views)
        assert opt.last_step_launches == 1
    reference, _ = _reference(name, kw, grads, params0)
    _close([host(v) for v in pbuf.views], reference, params0, 3)
    for s, (_, t) in zip(opt.state, reference):
        assert set(s) == set(t)
        for n in s:
            np.testing.assert_allclose(host(s[n]).reshape(-1), t[n].reshape(-1), rtol=1e-5, atol=1e-6, err_msg=n)
    padding = np.ones(pbuf.size, bool)
    for offset, view in zip(pbuf.offsets, pbuf.views):
        padding[offset : offset + view.size] = False
    np.testing.assert_array_equal(host(pbuf.data)[padding], 0.0)


@pytest.mark.parametrize("options", [{}, {"capturable": True, "skip_nonfinite": True}],
                         ids=["default", "capturable"])
def test_save_load_continue_on_the_device_is_bit_identical(backend, options, tmp_path):
    steps, cut = 4, 2
    params0, grads = problem(12, shapes=SHAPES, steps=steps)
    kind = native(backend)

    def build(params, lr=1e-2):
        groups = [{"params": params[:1], "lr": lr}, {"params": params[1:]}]
        return gpuadam.Adam(groups, amsgrad=True, weight_decay=0.01, backend=backend, **options)

    straight = put_all(params0, kind)
    opt = build(straight)
    for g in grads:
        opt.step(put_all(g, kind))
    first = put_all(params0, kind)
    opt1 = build(first)
    for g in grads[:cut]:
        opt1.step(put_all(g, kind))
    checkpoint.save(opt1, tmp_path / "opt.ckpt")
    resumed = put_all([host(p) for p in first], kind)
    opt2 = build(resumed, lr=0.5)
    checkpoint.load(opt2, tmp_path / "opt.ckpt")
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.steps == [cut] * len(SHAPES)
    for g in grads[cut:]:
        opt2.step(put_all(g, kind))
    assert opt2.steps == opt.steps == [steps] * len(SHAPES)
    for i, (a, b) in enumerate(zip(straight, resumed)):
        np.testing.assert_array_equal(host(a), host(b), err_msg=f"param {i}")
    for s, t in zip(opt.state, opt2.state):
        for n in s:
            np.testing.assert_array_equal(host(s[n]), host(t[n]), err_msg=n)
