"""GPU only: ``gpuadam.torch`` on torch CUDA tensors: a model trains as with torch's fused AdamW, a
flattened one in one launch, on a side stream, half params with master weights as on the CPU, and
no step makes torch synchronise (the simulator has no torch CUDA: these skip there)."""

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
