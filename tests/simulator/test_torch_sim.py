"""``gpuadam.torch``'s GPU step in Numba's CUDA simulator: torch CPU tensors stand in for CUDA ones
(their memory wrapped as simulator device arrays), the numba-cuda backend runs the kernels. Checked:
GradScaler's ``grad_scale``/``found_inf`` tensors, ``max_grad_norm``, ``skip_nonfinite``, tensor
``lr``s and ``capturable`` are consumed on the device (no host read of any tensor or device array),
every kernel goes to torch's stream, and the trajectory is the CPU path's."""

import numpy as np
import pytest
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[test]'")

import gpuadam.torch as gt  # noqa: E402
from gpuadam import backends  # noqa: E402
from gpuadam.torch import device_step, devices, views  # noqa: E402

STREAM = 0x5EED


@pytest.fixture
def on_device(monkeypatch):
    """Step through the (simulated) numba-cuda backend; the streams the bookkeeping asked for."""
    be = backends.get("numba-cuda")
    streams = []
    optimizers = []

    def backend_for(device, requested):
        return be if optimizers else backends.get("numba-cpu")

    def kernel_view(t, backend):
        host = devices.kernel_view(t, None)
        return host if backend is None or backend.kind == "host" else FakeCUDAArray(host)

    monkeypatch.setattr(gt, "backend_for", backend_for)
    for module in (gt, views):
        monkeypatch.setattr(module, "kernel_view", kernel_view)
    monkeypatch.setattr(device_step, "torch_view", lambda a, device: torch.from_numpy(a._ary))
    for module in (gt, device_step):
        monkeypatch.setattr(module, "stream_of", lambda device: STREAM if optimizers else None)
    monkeypatch.setattr(be, "external_stream", lambda handle: streams.append(handle) or 0)

    def make(cls, *args, **kw):
        optimizers.append(True)
        try:
            return cls(*args, **kw)
        finally:
            optimizers.pop()

    def step(opt):
        optimizers.append(True)
        try:
            return opt.step()
        finally:
            optimizers.pop()

    return make, step, streams


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def run(model, opt, step, scale, poison_at=None, found_inf_at=None, steps=4, first=0):
    """Train steps ``first..first+steps-1`` (the same batches for every model) with gradients scaled by
    ``scale`` (GradScaler's attributes set as it sets them); ``found_inf_at``: GradScaler found inf
    there; ``poison_at``: a NaN gradient there."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(first + steps)]
    for t in range(first, first + steps):
        x, y = data[t]
        opt.zero_grad(set_to_none=False)
        (torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y) * scale).backward()
        if t == poison_at:
            model[0].bias.grad[0] = float("nan")
        opt.grad_scale = torch.tensor(float(scale))
        opt.found_inf = torch.tensor(1.0 if t == found_inf_at else 0.0)
        step(opt)
        del opt.grad_scale, opt.found_inf


def no_host_reads(monkeypatch):
    """Fail on any read of a tensor's value or a device array on the host."""
    def refuse(*args, **kw):
        raise AssertionError("the GPU step read a value on the host")

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", refuse)


CASES = {
    "adam-flat": (gt.Adam, {"lr": 1e-2, "weight_decay": 0.1}, torch.float32, True),
    "adamw-bf16-master": (gt.AdamW, {"lr": 1e-2, "master_weights": True}, torch.bfloat16, False),
    "sgd-momentum": (gt.SGD, {"lr": 1e-1, "momentum": 0.9}, torch.float32, False),
    "nadam": (gt.NAdam, {"lr": 1e-2}, torch.float32, False),
    "adam-bfloat16-state": (gt.Adam, {"lr": 1e-2, "state_dtype": "bfloat16"}, torch.float32, False),
    "adamw-bf16-master-bfloat16-state": (gt.AdamW, {"lr": 1e-2, "master_weights": True, "state_dtype": "bfloat16"},
                                         torch.bfloat16, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grad_scaler_on_the_device_steps_as_the_cpu_path(case, on_device, monkeypatch):
    """Unscaling by a device ``grad_scale`` and skipping on a device ``found_inf``: bit for bit the
    CPU path's steps (which read them on the host), step counts and torch's state included."""
    make, step, streams = on_device
    cls, kw, dtype, flat = CASES[case]
    models = [make_model(dtype), make_model(dtype)]
    if flat:
        for m in models:
            gt.flatten_parameters(m)
    dev = make(cls, models[0].parameters(), **kw)
    host = cls(models[1].parameters(), **kw)
    run(models[1], host, lambda o: o.step(), 1024.0, found_inf_at=2)
    run(models[0], dev, step, 1024.0, found_inf_at=2, steps=1)  # the first step makes the state
    with monkeypatch.context() as m:
        no_host_reads(m)
        run(models[0], dev, step, 1024.0, found_inf_at=2, steps=3, first=1)
    assert dev.last_step_launches == (1 if flat else 4)
    assert set(streams) == {STREAM}
    assert dev.steps_skipped == host.steps_skipped == 1
    dev.state_dict()  # NAdam's mu_product (torch's) is brought up to date from the device's counts here
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p.detach(), q.detach())
        a, b = dev.state[p], host.state[q]
        assert list(a) == list(b)
        for n in a:
            assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flattened"])
def test_clipping_and_skipping_on_the_device_under_a_scaler(flat, on_device, monkeypatch):
    make, step, streams = on_device
    models = [make_model(), make_model()]
    if flat:
        for m in models:
            gt.flatten_parameters(m)
    kw = {"lr": 1e-2, "max_grad_norm": 0.05, "skip_nonfinite": True}
    dev = make(gt.AdamW, models[0].parameters(), **kw)
    host = gt.AdamW(models[1].parameters(), **kw)
    run(models[1], host, lambda o: o.step(), 256.0, poison_at=1, found_inf_at=2, steps=4)
    run(models[0], dev, step, 256.0, steps=1)
    with monkeypatch.context() as m:
        no_host_reads(m)
        run(models[0], dev, step, 256.0, poison_at=1, found_inf_at=2, steps=3, first=1)
    assert dev.steps_skipped == host.steps_skipped == 2
    assert float(dev.last_grad_norm) == pytest.approx(host.last_grad_norm, rel=1e-5)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert dev.state[p]["step"].item() == host.state[q]["step"].item() == 2
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert set(streams) == {STREAM}


def test_capturable_tensor_lr_and_a_new_group_mid_run(on_device, monkeypatch):
    """capturable: ``step`` is a float32 0-d tensor (the device's count), a tensor lr written in place
    (as a schedule does between graph replays) is the next step's lr, and a group added mid-run keeps
    the counts of the others."""
    make, step, _ = on_device
    models = [make_model(), make_model()]
    lr = torch.tensor(1e-2)
    dev = make(gt.Adam, [models[0][0].weight], lr=lr, capturable=True)
    host = gt.Adam([models[1][0].weight], lr=1e-2)
    for opt, m, st in ((dev, models[0], step), (host, models[1], lambda o: o.step())):
        run(m, opt, st, 1.0, steps=2)
    lr.fill_(5e-2)
    host.param_groups[0]["lr"] = 5e-2
    dev.add_param_group({"params": [models[0][2].weight], "lr": 1e-3})
    host.add_param_group({"params": [models[1][2].weight], "lr": 1e-3})
    with monkeypatch.context() as m:
        no_host_reads(m)
        run(models[0], dev, step, 1.0, steps=2, first=2)
    run(models[1], host, lambda o: o.step(), 1.0, steps=2, first=2)
    for p, q in ((models[0][0].weight, models[1][0].weight), (models[0][2].weight, models[1][2].weight)):
        st = dev.state[p]["step"]
        assert st.dtype == torch.float32 and st.dim() == 0
        assert st.item() == host.state[q]["step"].item()
        assert torch.equal(p.detach(), q.detach())
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="capturable=True keeps the step counts on the GPU: it takes CUDA params"):
        gt.Adam([p], capturable=True).step()
    assert torch.equal(p.detach(), torch.ones(2))


def test_a_param_without_a_gradient_keeps_its_count_on_the_device(on_device, monkeypatch):
    """torch's rule: a param whose grad is None does not step. Its count then differs from the others'
    (two slots in one group), and a later step gives each its own bias correction."""
    make, step, _ = on_device
    models = [make_model(), make_model()]
    dev = make(gt.Adam, models[0].parameters(), lr=1e-2)
    host = gt.Adam(models[1].parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(4)]
    for t, (x, y) in enumerate(data):
        for m, o, st in ((models[0], dev, step), (models[1], host, lambda o: o.step())):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if t == 1:
                m[0].bias.grad = None
            st(o)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert dev.state[p]["step"].item() == host.state[q]["step"].item()
        assert torch.equal(p.detach(), q.detach())
    assert dev.state[models[0][0].bias]["step"].item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16-master"])
def test_int8_state_under_a_scaler_on_the_device(dtype, on_device, monkeypatch):
    """Lean int8 moments on the device path, float32 params or half params with float32 masters:
    codes, absmax and masters as the CPU path's, bit for bit (the 4096-element floor lowered to one
    block of 256: the simulator runs every thread in Python)."""
    from gpuadam import lean

    monkeypatch.setattr(lean, "MIN_SIZE", 256)
    make, step, _ = on_device
    gen = torch.Generator().manual_seed(5)
    w0, b0 = torch.randn(300, generator=gen), torch.randn(7, generator=gen)
    params = [[torch.nn.Parameter(w0.to(dtype)), torch.nn.Parameter(b0.to(dtype))] for _ in range(2)]
    kw = {"lr": 1e-2, "state_dtype": "int8", "master_weights": dtype != torch.float32}
    dev = make(gt.Adam, params[0], **kw)
    host = gt.Adam(params[1], **kw)
    for t in range(3):
        grads = [(64 * torch.randn(n, generator=gen)).to(dtype) for n in (300, 7)]
        for ps, o, st in ((params[0], dev, step), (params[1], host, lambda o: o.step())):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.grad_scale, o.found_inf = torch.tensor(64.0), torch.tensor(1.0 if t == 1 else 0.0)
            st(o)
    for p, q in zip(*params):
        assert torch.equal(p.detach(), q.detach())
        assert list(dev.state[p]) == list(host.state[q])
        for n, v in host.state[q].items():
            assert torch.equal(dev.state[p][n], v), n
    assert "exp_avg_codes" in dev.state[params[0][0]] and dev.state[params[0][0]]["step"].item() == 2
