"""``gpuadam.torch`` on CUDA tensors, as far as a machine without a GPU can check it: the backend for
a device, the stream a launch goes to (torch's current one, passed on by both GPU backends), and
the refusal of params on several devices. The kernels on real CUDA tensors: tests/gpu."""

import types

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import gpuadam.torch as gt  # noqa: E402
from gpuadam import backends  # noqa: E402
from gpuadam.torch import devices  # noqa: E402


def test_backend_for_a_device():
    assert devices.backend_for(torch.device("cpu"), None).name == "numba-cpu"
    with pytest.raises(ValueError, match="params on meta: gpuadam.torch steps cpu and cuda tensors"):
        devices.backend_for(torch.device("meta"), None)
    with pytest.raises(ValueError, match="runs on host arrays, but the params are CUDA device arrays"):
        devices.backend_for(torch.device("cuda"), "numba-cpu")
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        gt.Adam(params, backend="nope")  # at construction, as gpuadam's optimizers
    if not any(backends.status(n).available for n in ("numba-cuda", "cupy")):
        with pytest.raises(backends.BackendUnavailable, match="no GPU backend can run here"):
            devices.backend_for(torch.device("cuda"), None)


def test_the_stream_is_torchs_current_stream_of_the_params_device():
    asked = []

    class Stream:
        cuda_stream = 0x5EED

    def current_stream(device):
        asked.append(device)
        return Stream()

    assert devices.stream_of(torch.device("cpu"), current_stream) is None
    assert devices.stream_of(torch.device("cuda", 1), current_stream) == 0x5EED
    assert asked == [torch.device("cuda", 1)]


def test_the_backends_launch_on_the_given_stream():
    launched = []

    class FakeNumba:
        def external_stream(self, handle):
            return ("numba stream", handle)

    be = object.__new__(backends.NumbaCUDA)
    be._cuda, be._streams = FakeNumba(), {}
    be._launch = lambda *args, stream: launched.append((args, stream))
    # the lean-state kernels have launchers of their own: on the given stream too
    be._lean = types.SimpleNamespace(LAUNCHERS={"adam/int8": lambda arrays, c, stream: launched.append(
        (("adam/int8", arrays, c), stream))})
    be.launch("adam", ("p", "g"), "c", stream=7)
    be.launch("adam", ("p", "g"), "c")
    be.launch("adam/int8", ("p", "g"), "c", stream=7)
    assert launched == [(("adam", ("p", "g"), "c"), ("numba stream", 7)), (("adam", ("p", "g"), "c"), 0),
                        (("adam/int8", ("p", "g"), "c"), ("numba stream", 7))]
    assert be.external_stream(7) is be.external_stream(7)  # made once per handle

    entered = []

    class External:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            entered.append(self.handle)

        def __exit__(self, *exc):
            entered.append("exit")

    class FakeCupy:
        class cuda:  # noqa: N801 (cupy's name)
            ExternalStream = External

    be = object.__new__(backends.CuPy)
    be._cupy, be._external = FakeCupy(), {}
    be._launch = lambda *args: launched.append((args, list(entered)))
    # its lean-state RawKernels inside the same stream context
    be._lean = types.SimpleNamespace(LAUNCHERS={"adam/int8": lambda arrays, c: launched.append(
        (("adam/int8", arrays, c), list(entered)))})
    launched.clear()
    be.launch("adam", ("p", "g"), "c", stream=9)
    be.launch("adam", ("p", "g"), "c")
    be.launch("adam/int8", ("p", "g"), "c", stream=9)
    assert launched == [(("adam", ("p", "g"), "c"), [9]), (("adam", ("p", "g"), "c"), [9, "exit"]),
                        (("adam/int8", ("p", "g"), "c"), [9, "exit", 9])]

    # the device bookkeeping of a torch step (norm, constants) goes to the same stream
    entered.clear()
    launched.clear()
    be.flat = lambda x: x
    be._bookkeeping = types.SimpleNamespace(
        grad_sumsq=lambda *args: launched.append(("sumsq", list(entered))),
        prepare=lambda *args: launched.append(("prepare", list(entered))))
    be.device_sumsq("g", "sums", None, 1.0, None, stream=9)
    be.device_prepare("fn", "args", stream=9)
    be.device_prepare("fn", "args")
    assert launched == [("sumsq", [9]), ("prepare", [9, "exit", 9]), ("prepare", [9, "exit", 9, "exit"])]


def test_a_step_launches_on_the_stream_it_is_given_and_never_synchronises(monkeypatch):
    """The step with a device's stream (faked on CPU tensors): every launch gets torch's current
    stream, and nothing waits for the device."""
    real = backends.get("numba-cpu")
    launches = []

    class OnStream:
        name, kind = "fake-cuda", real.kind

        def launch(self, rule, arrays, c, *extra, stream=None):
            launches.append(stream)
            real.launch(rule, arrays, c, *extra)

    monkeypatch.setattr(gt, "backend_for", lambda device, requested: OnStream())
    monkeypatch.setattr(gt, "stream_of", lambda device: 0xCAFE)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("step() synchronised"))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ref = torch.nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    ours, theirs = gt.Adam(model.parameters(), lr=0.1), torch.optim.Adam(ref.parameters(), lr=0.1, foreach=False)
    for m, o in ((model, ours), (ref, theirs)):
        for _ in range(3):
            o.zero_grad()
            m(torch.ones(3, 4)).square().sum().backward()
            o.step()
    assert launches == [0xCAFE] * 6
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6)


def test_params_on_two_devices_are_refused_before_anything_changes():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3, device="meta"))
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = gt.SGD([a, b], lr=0.1)
    with pytest.raises(ValueError, match=r"param 1 \(group 0, index 1\): is on meta, the other params on cpu"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3))
