"""``gpuadam.torch``: the drop-in torch.optim classes train a module as torch's do, keep torch's state,
exchange checkpoints with torch both ways, and work with lr schedulers, closures, None grads,
add_param_group and GradScaler."""

import io
import subprocess
import sys

import numpy as np
import pytest
from family_cases import CASES, case_id, torch_takes
from helpers import trajectory_error

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import gpuadam  # noqa: E402
import gpuadam.torch as gt  # noqa: E402

STEPS = 50
ADAM_CASES = [
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "maximize": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("AdamW", {"lr": 1e-2}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "betas": (0.5, 0.9)}),
]
# torch.optim's optimizers only, and none of our own flags
TORCH_CASES = [c for c in ADAM_CASES if c not in CASES] + [c for c in CASES if torch_takes(torch, *c)]
ONE_PER_NAME = list({name: (name, kw) for name, kw in reversed(TORCH_CASES)}.values())


@pytest.fixture
def default_dtype():
    """float64 runs use torch's float64 scalars (its NAdam keeps mu_product in the default dtype)."""
    previous = torch.get_default_dtype()
    yield lambda dtype: torch.set_default_dtype(dtype if dtype == torch.float64 else previous)
    torch.set_default_dtype(previous)


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(dtype)


def batches(dtype, steps=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen, dtype=dtype), torch.randn(8, 3, generator=gen, dtype=dtype))
            for _ in range(steps)]


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def both(name, kw, dtype=torch.float64):
    """The same model twice, with ours and with torch's optimizer."""
    ours_model, theirs_model = make_model(dtype), make_model(dtype)
    ours = getattr(gt, name)(ours_model.parameters(), **kw)
    theirs = getattr(torch.optim, name)(theirs_model.parameters(), foreach=False, **kw)
    return ours_model, ours, theirs_model, theirs


def assert_same(ours_model, ours, theirs_model, theirs, p0s=None, steps=STEPS, bound=None):
    """The same params (within the float rounding of ``steps`` steps), the same state, names and order."""
    for k, (a, b) in enumerate(zip(ours_model.parameters(), theirs_model.parameters())):
        x, y = a.detach().numpy(), b.detach().numpy()
        if bound is None:
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, err_msg=f"param {k}")
        else:
            assert trajectory_error(x, y.astype(np.float64), p0s[k], steps) < bound, f"param {k}"
        sa, sb = ours.state[a], theirs.state[b]
        assert list(sa) == list(sb), f"param {k}"
        for n in sa:
            u, v = sa[n], sb[n]
            assert isinstance(u, torch.Tensor) and u.dtype == v.dtype and u.shape == v.shape, (k, n)
            if n == "step":
                assert u.item() == v.item(), k
            else:
                tol = 1e-9 if bound is None else 1e-4
                np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=tol, atol=tol * 1e-3, err_msg=f"{k} {n}")


def test_import_gpuadam_does_not_import_torch():
    code = "import sys, gpuadam; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_trains_like_torch_float64(case, default_dtype):
    default_dtype(torch.float64)
    name, kw = case
    ours_model, ours, theirs_model, theirs = both(name, kw)
    p0 = [p.detach().clone() for p in ours_model.parameters()]
    data = batches(torch.float64, steps=10 if kw.get("maximize") else STEPS)  # climbing the loss diverges
    train(ours_model, ours, data)
    train(theirs_model, theirs, data)
    assert all(torch.isfinite(p).all() for p in ours_model.parameters())
    assert any((p - q).abs().max() > 0 for p, q in zip(ours_model.parameters(), p0))
    assert_same(ours_model, ours, theirs_model, theirs)


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=case_id)
def test_trains_like_torch_float32(case):
    name, kw = case
    ours_model, ours, theirs_model, theirs = both(name, kw, torch.float32)
    p0s = [p.detach().numpy().copy() for p in ours_model.parameters()]
    data = batches(torch.float32)
    train(ours_model, ours, data)
    train(theirs_model, theirs, data)
    assert_same(ours_model, ours, theirs_model, theirs, p0s, bound=4.0)


def test_the_state_tensors_are_the_kernels_buffers():
    model = make_model()
    opt = gt.Adam(model.parameters(), lr=1e-2)
    data = batches(torch.float64, steps=3)
    train(model, opt, data[:1])
    p = next(model.parameters())
    held = {n: (t, t.data_ptr(), t.clone()) for n, t in opt.state[p].items()}
    train(model, opt, data[1:])
    for n, (t, ptr, before) in held.items():
        assert opt.state[p][n] is t and t.data_ptr() == ptr, n
        assert not torch.equal(t, before), n
    assert opt.state[p]["step"].item() == 3 and opt.state[p]["step"].dtype == torch.float32


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=case_id)
def test_checkpoint_exchange_both_ways(case, default_dtype):
    default_dtype(torch.float64)
    name, kw = case
    data = batches(torch.float64, steps=40)
    for first, second in ((torch.optim, gt), (gt, torch.optim)):
        # the run through a checkpoint: 20 steps of one, saved, loaded into the other, 20 more
        model = make_model()
        a = getattr(first, name)(model.parameters(), **kw)
        train(model, a, data[:20])
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": a.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        resumed = make_model(seed=7)
        resumed.load_state_dict(saved["model"])
        b = getattr(second, name)(resumed.parameters(), **kw)
        b.load_state_dict(saved["opt"])
        train(resumed, b, data[20:])
        # the run the checkpoint must continue: the second's own, uninterrupted
        whole = make_model()
        c = getattr(second, name)(whole.parameters(), **kw)
        train(whole, c, data)
        assert_same(resumed, b, whole, c) if second is gt else assert_same(whole, c, resumed, b)


def test_loaded_state_is_not_shared_with_the_state_dict():
    model = make_model()
    theirs = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, theirs, batches(torch.float64, steps=2))
    ours = gt.Adam(model.parameters(), lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    before = {n: t.clone() for n, t in theirs.state[next(model.parameters())].items()}
    train(model, ours, batches(torch.float64, steps=1, seed=3))
    for n, t in theirs.state[next(model.parameters())].items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.3),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
], ids=["StepLR", "LambdaLR"])
def test_lr_schedulers(make_scheduler):
    ours_model, ours, theirs_model, theirs = both("Adam", {"lr": 3e-2})
    data = batches(torch.float64)
    train(ours_model, ours, data, make_scheduler(ours))
    train(theirs_model, theirs, data, make_scheduler(theirs))
    assert_same(ours_model, ours, theirs_model, theirs)
    plain_model, plain, _, _ = both("Adam", {"lr": 3e-2})
    train(plain_model, plain, data)
    assert not torch.allclose(next(plain_model.parameters()), next(ours_model.parameters()))


def test_tensor_lr():
    ours_model, ours, theirs_model, theirs = both("AdamW", {"lr": torch.tensor(2e-2, dtype=torch.float64)})
    data = batches(torch.float64)
    train(ours_model, ours, data)
    train(theirs_model, theirs, data)
    assert_same(ours_model, ours, theirs_model, theirs)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_none_grads_are_skipped(name):
    kw = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    ours_model, ours, theirs_model, theirs = both(name, kw)
    for model, opt in ((ours_model, ours), (theirs_model, theirs)):
        frozen = model[0].bias
        before = frozen.detach().clone()
        for t, (x, y) in enumerate(batches(torch.float64, steps=10)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if t < 5:
                frozen.grad = None  # no grad for the first five steps
            opt.step()
            if t < 5:
                assert torch.equal(frozen, before) and not opt.state[frozen]
    assert_same(ours_model, ours, theirs_model, theirs)
    if name == "Adam":
        assert ours.state[ours_model[0].bias]["step"].item() == 5
        assert ours.state[ours_model[0].weight]["step"].item() == 10


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "SGD"])
def test_add_param_group_mid_run(name):
    kw = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    data = batches(torch.float64)
    runs = []
    for module in (gt, torch.optim):
        model = make_model()
        opt = getattr(module, name)(model[0].parameters(), **kw)
        train(model, opt, data[:10])
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-2})
        train(model, opt, data[10:])
        runs.append((model, opt))
    assert runs[0][1].param_groups[1]["lr"] == 5e-2
    assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


def test_closure_runs_with_grad_and_returns_the_loss():
    ours_model, ours, theirs_model, theirs = both("RMSprop", {"lr": 1e-2})
    x, y = batches(torch.float64, steps=1)[0]
    for model, opt in ((ours_model, ours), (theirs_model, theirs)):
        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert_same(ours_model, ours, theirs_model, theirs)


def test_torch_optimizer_machinery():
    model = make_model()
    opt = gt.Adam(model.parameters(), lr=1e-2, foreach=True, fused=True)  # accepted, ignored
    assert isinstance(opt, torch.optim.Optimizer)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(model, opt, batches(torch.float64, steps=2))
    assert calls == ["pre", "post", "pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps_root"] == 0.0


def test_refusals():
    model = make_model()
    with pytest.raises(ValueError, match="differentiable=True"):
        gt.Adam(model.parameters(), differentiable=True)
    with pytest.raises(ValueError, match="capturable=True with stochastic rounding"):
        gt.AdamW(model.parameters(), capturable=True, state_dtype="bfloat16")
    capturable = gt.AdamW(model.parameters(), capturable=True)  # CUDA params: the step refuses CPU ones
    with pytest.raises(ValueError, match="lr"):
        gt.Adam(model.parameters(), lr=-1.0)
    with pytest.raises(TypeError):
        gt.SGD(model.parameters(), 0.1, 0.9, eps_root=1e-3)  # not an SGD option
    opt = gt.Adam(model.parameters(), lr=1e-2)
    x, y = batches(torch.float64, steps=1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="capturable=True keeps the step counts on the GPU: it takes CUDA params"):
        capturable.step()
    assert not capturable.state
    model[2].weight.grad = model[2].weight.grad.t().contiguous().t()  # the third param's grad: strided
    with pytest.raises(ValueError, match=r"param 2 \(group 0, index 2\): its gradient is not contiguous"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state  # nothing was stepped, not even the params before it
    opt.param_groups[0]["lr"] = float("nan")
    model[2].weight.grad = None
    with pytest.raises(ValueError, match="param group 0: lr"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grad_scaler_unscales_in_the_kernel_and_skips_inf_steps(name):
    kw = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2, "eps": 1e-3}
    ours_model, ours, theirs_model, theirs = both(name, kw)
    data = batches(torch.float64, steps=12)
    for model, opt in ((ours_model, ours), (theirs_model, theirs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        for t, (x, y) in enumerate(data):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t == 6:
                model[0].weight.grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
                steps_before = [s["step"].item() for s in opt.state.values() if "step" in s]
            scaler.step(opt)
            scaler.update()
            if t == 6:
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
                assert [s["step"].item() for s in opt.state.values() if "step" in s] == steps_before
    # ours never unscaled the gradients in memory: its kernel did
    assert ours_model[0].weight.grad.abs().max() > 10 * theirs_model[0].weight.grad.abs().max()
    assert_same(ours_model, ours, theirs_model, theirs)


def test_lion_matches_gpuadam_lion():
    model = make_model(torch.float32)
    p0 = [p.detach().numpy().copy() for p in model.parameters()]
    opt = gt.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    grads = []
    for x, y in batches(torch.float32, steps=10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
    ref = gpuadam.Lion(p0, lr=1e-3, weight_decay=0.1)
    for g in grads:
        ref.step(g)
    for p, q, s, r in zip(model.parameters(), p0, opt.state.values(), ref.state):
        assert np.array_equal(p.detach().numpy(), q)
        assert np.array_equal(s["exp_avg"].numpy().reshape(-1), r["exp_avg"])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"])
def test_signature_is_torchs_plus_our_keywords(name):
    import inspect

    ours = inspect.signature(getattr(gt, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for key, param in theirs.items():
        assert ours[key].default == param.default and ours[key].kind == param.kind, key
    extra = set(ours) - set(theirs)
    options = {"backend", "max_grad_norm", "skip_nonfinite", "master_weights", "stochastic_rounding", "seed"}
    assert options <= extra <= options | {"eps_root", "bias_correction", "ema_momentum", "state_dtype"}
    assert ("state_dtype" in extra) == (name in ("Adam", "AdamW", "NAdam", "RAdam"))  # moments: exp_avg, exp_avg_sq
    assert all(ours[k].kind == inspect.Parameter.KEYWORD_ONLY for k in extra)
    model = make_model()
    positional = [k for k, p in theirs.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
    args = [theirs[k].default for k in positional]
    assert getattr(gt, name)(model.parameters(), *args).param_groups[0].keys() >= \
        getattr(torch.optim, name)(model.parameters(), *args).param_groups[0].keys()


def test_a_step_after_a_load_a_new_group_or_new_param_data_updates_the_new_memory():
    """The step caches each param's NumPy views: replacing p.data, the state (load_state_dict, or a
    buffer by hand) or adding a group must make the next step write to the new tensors, as torch's."""
    def pair():
        ours_model, theirs_model = make_model(), make_model()
        return (ours_model, gt.Adam(ours_model.parameters(), lr=1e-2),
                theirs_model, torch.optim.Adam(theirs_model.parameters(), lr=1e-2, foreach=False))

    ours_model, ours, theirs_model, theirs = pair()
    data = batches(torch.float64, steps=12)
    train(ours_model, ours, data[:2])
    train(theirs_model, theirs, data[:2])
    # a load: the state tensors are new ones (and the step counts go back)
    ref_model, ref, _, _ = pair()
    train(ref_model, ref, data[:1])
    ours.load_state_dict(ref.state_dict())
    theirs.load_state_dict(ref.state_dict())
    train(ours_model, ours, data[2:4])
    train(theirs_model, theirs, data[2:4])
    assert_same(ours_model, ours, theirs_model, theirs)
    # new param memory: p.data replaced in both
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        fresh = a.detach().clone() * 0.5
        a.data, b.data = fresh, fresh.clone()
    train(ours_model, ours, data[4:6])
    train(theirs_model, theirs, data[4:6])
    assert_same(ours_model, ours, theirs_model, theirs)
    # a state buffer replaced by hand, and a step count changed in place
    for o, m in ((ours, ours_model), (theirs, theirs_model)):
        p = next(m.parameters())
        o.state[p]["exp_avg"] = o.state[p]["exp_avg"].clone() * 2
        o.state[p]["step"].fill_(1)
    train(ours_model, ours, data[6:8])
    train(theirs_model, theirs, data[6:8])
    assert_same(ours_model, ours, theirs_model, theirs)
    # a new group: its params step too, and the old ones still write where they live
    extra_ours = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    extra_theirs = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    ours.add_param_group({"params": [extra_ours], "lr": 0.1})
    theirs.add_param_group({"params": [extra_theirs], "lr": 0.1})
    for x, y in data[8:12]:
        for o, m, e in ((ours, ours_model, extra_ours), (theirs, theirs_model, extra_theirs)):
            o.zero_grad()
            (torch.nn.functional.mse_loss(m(x), y) + (e * e).sum()).backward()
            o.step()
    assert_same(ours_model, ours, theirs_model, theirs)
    np.testing.assert_allclose(extra_ours.detach().numpy(), extra_theirs.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert ours.state[extra_ours]["step"].item() == 4
