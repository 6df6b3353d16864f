"""Every optimizer matches torch.optim (when torch is installed): the same trajectories and state
for each case of ``family_cases.CASES`` that torch has (Adam and AdamW included), and for the family
the same names, defaults and argument checks, so users switch without retuning."""

import inspect

import numpy as np
import pytest
from family_cases import CASES, NAMES, case_id, torch_takes
from helpers import problem, trajectory_error

import gpuadam

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the parity tests against torch.optim need pip install -e '.[test]'")

STEPS = 20


TORCH_CASES = [c for c in CASES if torch_takes(torch, *c)]
TORCH_NAMES = [name for name in NAMES if hasattr(torch.optim, name)]


@pytest.fixture
def torch_default_dtype(request):
    """float64 runs use torch's float64 scalars: PyTorch keeps NAdam's mu_product (a state scalar)
    in the default dtype, float32 unless set."""
    previous = torch.get_default_dtype()
    yield lambda dtype: torch.set_default_dtype(torch.float64 if dtype == np.float64 else previous)
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch(case, dtype, torch_default_dtype):
    torch_default_dtype(dtype)
    name, kw = case
    params0, grads = problem(21, dtype=dtype, steps=STEPS)
    ours = [p.copy() for p in params0]
    opt = getattr(gpuadam, name)(ours, **kw)
    theirs = [torch.tensor(p.copy()) for p in params0]
    topt = getattr(torch.optim, name)(theirs, foreach=False, **kw)
    for g in grads:
        opt.step(g)
        for t, x in zip(theirs, g):
            t.grad = torch.tensor(x)
        topt.step()
    eps = np.finfo(dtype).eps
    for a, t, p0, state in zip(ours, theirs, params0, opt.state):
        b = t.detach().numpy()
        # both are rounded trajectories of the same exact one: each within its budget of it
        assert trajectory_error(a, b.astype(np.float64), p0, STEPS) < 2.0
        assert np.abs(b - p0).max() > 0
        tstate = topt.state[t]
        for n, value in state.items():  # the same state, under the same names
            r = tstate[n].numpy().astype(np.float64)
            assert np.abs(value.reshape(r.shape) - r).max() <= STEPS * 8 * eps * np.abs(r).max(), n


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_names_and_defaults_are_torchs(name):
    ours = inspect.signature(getattr(gpuadam, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    torch_only = {"foreach", "differentiable", "fused"}
    # every optimizer's shared options (torch's SGD and Adagrad have no capturable); state_dtype where
    # the state is exp_avg and exp_avg_sq
    ours_only = {"backend", "ema_momentum", "skip_nonfinite", "capturable", "master_weights", "stochastic_rounding",
                 "seed", "half_format", "state_dtype"}
    assert set(theirs) - torch_only <= set(ours)
    assert set(ours) - ours_only <= set(theirs)
    for key, param in ours.items():
        if key in theirs and key != "params":
            assert param.default == theirs[key].default, key
    # a positional call means the same to both (what PyTorch takes elsewhere, we take by keyword only)
    positional = [k for k, p in ours.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)[: len(positional)]


BAD = [
    ("SGD", {"lr": -1.0}), ("SGD", {"momentum": -0.1}), ("SGD", {"weight_decay": -1.0}),
    ("SGD", {"nesterov": True}), ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("RMSprop", {"alpha": -0.1}), ("RMSprop", {"eps": -1.0}), ("RMSprop", {"momentum": -1.0}),
    ("RMSprop", {"weight_decay": -1.0}), ("Adagrad", {"lr_decay": -1.0}),
    ("Adagrad", {"initial_accumulator_value": -1.0}), ("Adagrad", {"eps": -1.0}),
    ("Adamax", {"betas": (1.0, 0.9)}), ("Adamax", {"betas": (0.9, -0.1)}), ("Adamax", {"eps": -1.0}),
    ("NAdam", {"momentum_decay": -1.0}), ("NAdam", {"betas": (0.9, 1.0)}), ("RAdam", {"betas": (-0.1, 0.9)}),
    ("RAdam", {"weight_decay": -1.0}),
]


@pytest.mark.parametrize("name,kw", BAD, ids=[f"{n}-{','.join(k)}" for n, k in BAD])
def test_both_refuse_the_same_arguments(name, kw):
    with pytest.raises(ValueError):
        getattr(torch.optim, name)([torch.zeros(3, requires_grad=True)], **kw)
    with pytest.raises(ValueError):
        getattr(gpuadam, name)([np.zeros(3, np.float32)], **kw)


def test_ema_momentum_is_pytorchs_dampened_momentum_but_for_the_first_step():
    """Documented: ``ema_momentum`` is PyTorch's recurrence with ``dampening=momentum``, except that
    PyTorch's first step copies the gradient into the buffer where ours starts from zero."""
    params0, grads = problem(22, steps=6)
    ours = [p.copy() for p in params0]
    opt = gpuadam.SGD(ours, lr=0.05, momentum=0.8, ema_momentum=True)
    opt.step(grads[0])
    for s, g in zip(opt.state, grads[0]):
        np.testing.assert_allclose(s["momentum_buffer"], 0.2 * g.reshape(-1), rtol=1e-6)  # PyTorch's: g
    theirs = [torch.tensor(p) for p in ours]  # PyTorch from our state after step one
    topt = torch.optim.SGD(theirs, lr=0.05, momentum=0.8, dampening=0.8, foreach=False)
    for t, s in zip(theirs, opt.state):
        topt.state[t]["momentum_buffer"] = torch.tensor(s["momentum_buffer"].reshape(t.shape))
    for g in grads[1:]:
        opt.step(g)
        for t, x in zip(theirs, g):
            t.grad = torch.tensor(x)
        topt.step()
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a, t.numpy(), rtol=1e-6, atol=1e-6)
