"""A training step compiled with ``torch.compile`` that calls a ``gpuadam.torch`` step: dynamo does
not trace the step (NumPy views, Numba dispatchers), it breaks the graph there, runs the step
eagerly and resumes; the trajectory is the eager one. (``backend="eager"``: dynamo's tracing and
graph breaks without inductor's minutes of C++ compilation; inductor behaves the same here.)"""

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import gpuadam.torch as gt  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_a_compiled_training_step_runs_our_step_eagerly_at_a_graph_break():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_model, eager_model = make_model(), make_model()
    compiled_opt = gt.Adam(compiled_model.parameters(), lr=1e-2, max_grad_norm=1.0)
    eager_opt = gt.Adam(eager_model.parameters(), lr=1e-2, max_grad_norm=1.0)
    compiled = torch.compile(step, backend="eager")
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        assert torch.equal(compiled(compiled_model, compiled_opt, x, y), step(eager_model, eager_opt, x, y))
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    assert compiled_opt.state[next(compiled_model.parameters())]["step"].item() == 4
    assert any("FusedOptimizer.step" in reason for reason in counters["graph_break"])
