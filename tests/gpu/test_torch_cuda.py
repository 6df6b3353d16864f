"""GPU only: ``gpuadam.torch`` on torch CUDA tensors: a model trains as with torch's fused AdamW, a
flattened one in one launch, on a side stream, half params with master weights as on the CPU, under
GradScaler with injected inf steps and with the fused max_grad_norm, a capturable step captured in a
CUDA graph and replayed as eager steps, and no step makes torch synchronise (the simulator has no
torch CUDA: these skip there; tests/simulator/test_torch_sim.py runs the same step on stand-ins)."""

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import gpuadam.torch as gt  # noqa: E402

pytestmark = pytest.mark.usefixtures("real_gpu")

CUDA = torch.device("cuda")


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(CUDA, dtype)


def batches(dtype=torch.float32, steps=20):
    gen = torch.Generator(device=CUDA).manual_seed(1)
    return [(torch.randn(16, 32, generator=gen, device=CUDA, dtype=dtype),
             torch.randn(16, 4, generator=gen, device=CUDA, dtype=dtype)) for _ in range(steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flattened"])
def test_trains_as_torch_fused_adam_without_synchronising(flat):
    model, ref = make_model(), make_model()
    if flat:
        gt.flatten_parameters(model)
    ours = gt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    data = batches()
    train(model, ours, data[:1])  # compiles the kernels outside the sync check
    train(ref, theirs, data[:1])
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(model, ours, data[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    train(ref, theirs, data[1:])
    assert ours.last_step_launches == (1 if flat else 4)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_launches_on_torchs_current_stream():
    model, ref = make_model(), make_model()
    ours = gt.Adam(model.parameters(), lr=1e-2)
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # backward and step on the side stream, no synchronisation between
        train(model, ours, batches())
        train(ref, theirs, batches())
    side.synchronize()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_with_master_weights_as_on_the_cpu():
    model = make_model(torch.bfloat16)
    cpu = make_model(torch.bfloat16).cpu()
    ours = gt.Adam(model.parameters(), lr=1e-2, master_weights=True)
    mine = gt.Adam(cpu.parameters(), lr=1e-2, master_weights=True)
    for x, y in batches(torch.bfloat16, steps=5):
        for m, o, xx, yy in ((model, ours, x, y), (cpu, mine, x.cpu(), y.cpu())):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(xx), yy).backward()
        for a, b in zip(model.parameters(), cpu.parameters()):
            b.grad.copy_(a.grad.cpu())  # the same gradients on both
        ours.step()
        mine.step()
    for a, b in zip(model.parameters(), cpu.parameters()):
        torch.testing.assert_close(ours.state[a]["master"].cpu(), mine.state[b]["master"], rtol=1e-6, atol=1e-7)


def test_a_param_on_another_device_is_refused():
    a = torch.nn.Parameter(torch.ones(3, device=CUDA))
    b = torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    with pytest.raises(ValueError, match="is on cpu, the other params on cuda"):
        gt.SGD([a, b], lr=0.1).step()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "max_grad_norm"])
def test_grad_scaler_with_injected_inf_steps_as_torch_fused_without_synchronising(clip):
    """GradScaler's grad_scale and found_inf are read on the device: a step with an inf gradient changes
    nothing (step counts included), the others unscale (and clip by the global norm) in the kernel."""
    model, ref = make_model(), make_model()
    ours = gt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=clip)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    scalers = torch.amp.GradScaler("cuda", init_scale=1024.0), torch.amp.GradScaler("cuda", init_scale=1024.0)
    data = batches(steps=8)
    for t, (x, y) in enumerate(data):
        for m, o, scaler in ((model, ours, scalers[0]), (ref, theirs, scalers[1])):
            o.zero_grad(set_to_none=False)
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if t in (2, 5):
                m[0].bias.grad[0] = float("inf")
            if o is theirs and clip:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            if o is ours and t > 0:  # the first step makes the state; the others never synchronise
                torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(o)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            scaler.update()
    assert ours.steps_skipped == 2
    for a, b in zip(model.parameters(), ref.parameters()):
        assert ours.state[a]["step"].item() == theirs.state[b]["step"].item() == 6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_captured_capturable_step_replays_as_eager_steps():
    """capturable=True: the step (with GradScaler's tensors, a tensor lr and the fused max_grad_norm)
    captured once in a CUDA graph, replayed with new gradients, a written lr and an inf step, as an
    eager optimizer steps (the norm's atomic sums may round apart in the last bits)."""
    models = make_model(), make_model()
    lrs = torch.tensor(1e-2, device=CUDA), torch.tensor(1e-2, device=CUDA)
    opts = [gt.Adam(m.parameters(), lr=lr, capturable=True, max_grad_norm=1.0) for m, lr in zip(models, lrs)]
    scale, found = torch.full((1,), 4.0, device=CUDA), torch.zeros(1, device=CUDA)
    for m in models:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)

    def step(o):
        o.grad_scale, o.found_inf = scale, found
        o.step()

    gen = torch.Generator(device=CUDA).manual_seed(2)
    grads = [[4 * torch.randn(p.shape, generator=gen, device=CUDA) for p in models[0].parameters()]
             for _ in range(6)]

    def set_grads(m, t):
        for p, g in zip(m.parameters(), grads[t]):
            p.grad.copy_(g)

    for m, o in zip(models, opts):  # a first eager step: kernels compiled, state made
        set_grads(m, 0)
        step(o)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        step(opts[0])
    torch.cuda.current_stream().wait_stream(side)
    for t in range(1, 6):
        found.fill_(1.0 if t == 3 else 0.0)
        if t == 4:
            lrs[0].fill_(3e-2)
            lrs[1].fill_(3e-2)
        set_grads(models[0], t)
        graph.replay()
        set_grads(models[1], t)
        step(opts[1])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert opts[0].state[a]["step"].item() == opts[1].state[b]["step"].item() == 5
        assert opts[0].state[a]["step"].device.type == "cuda"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert opts[0].steps_skipped == opts[1].steps_skipped == 1


def test_int8_state_on_cuda_as_on_the_cpu():
    """state_dtype="int8" on CUDA float32 params: codes, absmax and params bit for bit the CPU's."""
    torch.manual_seed(0)
    w = torch.randn(3 * 4096 + 100)
    params = [torch.nn.Parameter(w.clone().to(CUDA)), torch.nn.Parameter(w.clone())]
    ours = gt.AdamW([params[0]], lr=1e-2, state_dtype="int8")
    mine = gt.AdamW([params[1]], lr=1e-2, state_dtype="int8")
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        g = torch.randn(w.shape, generator=gen)
        params[0].grad, params[1].grad = g.to(CUDA), g.clone()
        ours.step()
        mine.step()
    assert torch.equal(params[0].detach().cpu(), params[1].detach())
    for n, v in mine.state[params[1]].items():
        assert torch.equal(ours.state[params[0]][n].cpu(), v), n
