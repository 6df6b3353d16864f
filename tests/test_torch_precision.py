"""``gpuadam.torch``: the fused ``max_grad_norm`` is ``clip_grad_norm_`` over every group's params
then the step; float16/bfloat16 params (master weights, stochastic rounding, skipping non-finite
steps) step bit for bit as gpuadam's own optimizer on the same bits, and as torch in float32."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import torch_models  # noqa: E402
from torch_models import make_model  # noqa: E402

import gpuadam  # noqa: E402
import gpuadam.torch as gt  # noqa: E402

STEPS = 8


batches = functools.partial(torch_models.batches, steps=STEPS)


def backward(model, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flattened"])
def test_max_grad_norm_is_clip_grad_norm_over_all_groups_then_step(flat):
    model, ref = make_model(), make_model()
    # the bias group clips by the norm of every gradient (both groups), the weight group does not clip
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "max_grad_norm": 0.05}]
    if flat:
        gt.flatten_parameters(groups)
    ours = gt.AdamW(groups, lr=1e-2)
    theirs = torch.optim.AdamW([{"params": [ref[0].weight, ref[2].weight]},
                                {"params": [ref[0].bias, ref[2].bias]}], lr=1e-2, foreach=False)
    clipped = 0
    for x, y in batches():
        for m, o in ((model, ours), (ref, theirs)):
            o.zero_grad(set_to_none=False)
            backward(m, x, y)
        norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        clip = min(1.0, 0.05 / (float(norm) + 1e-6))
        clipped += clip < 1.0
        for p in (ref[0].bias, ref[2].bias):
            p.grad.mul_(clip)
        ours.step()
        theirs.step()
        assert ours.last_grad_norm == pytest.approx(float(norm), rel=1e-12)
        assert ours.last_step_launches == (2 if flat else 4)
    assert clipped == STEPS
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-13)


def test_max_grad_norm_under_grad_scaler_clips_the_unscaled_gradients():
    """AMP's recipe (unscale_, clip_grad_norm_, step) in one fused step, on a flattened model."""
    model, ref = make_model(), make_model()
    gt.flatten_parameters(model)
    ours = gt.Adam(model.parameters(), lr=1e-2, max_grad_norm=0.05)
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    for x, y in batches(steps=4):
        for m, o, scaler in ((model, ours, scalers[0]), (ref, theirs, scalers[1])):
            o.zero_grad(set_to_none=False)
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if o is theirs:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(o)
            scaler.update()
        assert ours.last_step_launches == 1
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-13)


def test_max_grad_norm_keyword_matches_clip_grad_norm_in_float32():
    model, ref = make_model(torch.float32), make_model(torch.float32)
    ours = gt.Adam(model.parameters(), lr=1e-2, max_grad_norm=0.1)
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    for x, y in batches(torch.float32):
        for m, o in ((model, ours), (ref, theirs)):
            o.zero_grad()
            backward(m, x, y)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_grad_norm: expected None or a finite number > 0"):
        gt.Adam(model.parameters(), max_grad_norm=-1.0)


def bits(t):
    """A half tensor's 16-bit patterns as a NumPy uint16 array (a copy)."""
    return t.detach().view(torch.int16).numpy().view(np.uint16).copy()


HALF_CASES = [
    (torch.bfloat16, {}),
    (torch.bfloat16, {"master_weights": True}),
    (torch.bfloat16, {"stochastic_rounding": True, "seed": 7}),
    (torch.float16, {"master_weights": True, "skip_nonfinite": True}),
]


@pytest.mark.parametrize("dtype, kw", HALF_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_half_params_step_bitwise_as_gpuadams_optimizer(dtype, kw):
    model = make_model(dtype)
    p0 = [bits(p) for p in model.parameters()]
    opt = gt.Adam(model.parameters(), lr=1e-2, weight_decay=0.01, **kw)
    fmt = "bfloat16" if dtype == torch.bfloat16 else "float16"
    ref = gpuadam.Adam(p0, lr=1e-2, weight_decay=0.01, half_format=fmt, **kw)
    for t, (x, y) in enumerate(batches(dtype)):
        opt.zero_grad()
        backward(model, x, y)
        if t == 3 and kw.get("skip_nonfinite"):
            model[0].bias.grad[0] = float("nan")
        before = [bits(p) for p in model.parameters()]
        opt.step()
        ref.step([bits(p.grad) for p in model.parameters()])
        moved = any((bits(p) != b).any() for p, b in zip(model.parameters(), before))
        assert moved != (t == 3 and "skip_nonfinite" in kw)
    assert opt.steps_skipped == ref.steps_skipped == (1 if kw.get("skip_nonfinite") else 0)
    for k, (p, q) in enumerate(zip(model.parameters(), p0)):
        np.testing.assert_array_equal(bits(p).reshape(-1), q.reshape(-1), err_msg=f"param {k}")
        state, theirs = opt.state[p], ref.state[k]
        assert state["step"].item() == ref.steps[k]
        for n, a in theirs.items():
            want = torch.float32 if kw.get("master_weights") else dtype
            assert state[n].dtype == want, n
            mine = state[n].detach().numpy() if want == torch.float32 else bits(state[n])
            np.testing.assert_array_equal(mine.reshape(-1), np.asarray(a).reshape(-1), err_msg=f"{k} {n}")


def test_bfloat16_master_weights_follow_torch_in_float32():
    """The same (bfloat16) gradients: our float32 master is torch's float32 param, the bfloat16 param
    its rounding; a torch checkpoint without masters loads (they are made from the params)."""
    model = make_model(torch.bfloat16)
    ref = make_model(torch.float32)
    with torch.no_grad():
        for a, b in zip(model.parameters(), ref.parameters()):
            b.copy_(a.float())
    ours = gt.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for x, y in batches(torch.bfloat16):
        ours.zero_grad()
        backward(model, x, y)
        for a, b in zip(model.parameters(), ref.parameters()):
            b.grad = a.grad.float()
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        master = ours.state[a]["master"]
        np.testing.assert_allclose(master.numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.detach(), master.to(torch.bfloat16))
    torch_half = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    torch_half.step()  # bfloat16 state, no masters
    fresh = gt.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    fresh.load_state_dict(torch_half.state_dict())
    for p in model.parameters():
        state = fresh.state[p]
        assert state["exp_avg"].dtype == torch.float32 and torch.equal(state["master"], p.detach().float())
    with pytest.raises(ValueError, match="stochastic_rounding is for bfloat16 params without master"):
        gt.Adam(model.parameters(), master_weights=True, stochastic_rounding=True)
