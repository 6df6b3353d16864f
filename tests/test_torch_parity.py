"""Same results as torch.optim.Adam/AdamW (when torch is installed): users switch without retuning."""

import numpy as np
import pytest
from helpers import problem, trajectory_error

import gpuadam

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the parity tests against torch.optim need pip install -e '.[test]'")

CASES = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"maximize": True, "weight_decay": 0.1}),
    ("Adam", {"betas": (0.5, 0.9), "eps": 1e-6, "lr": 1e-2}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.3, "amsgrad": True, "lr": 3e-3}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{','.join(k) or 'default'}" for n, k in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch(name, kw, dtype):
    steps = 25
    params0, grads = problem(21, dtype=dtype, steps=steps)
    ours = [p.copy() for p in params0]
    opt = getattr(gpuadam, name)(ours, **kw)
    theirs = [torch.tensor(p.copy()) for p in params0]
    topt = getattr(torch.optim, name)(theirs, foreach=False, **kw)
    for g in grads:
        opt.step(g)
        for t, x in zip(theirs, g):
            t.grad = torch.tensor(x)
        topt.step()
    for a, t, p0 in zip(ours, theirs, params0):
        b = t.numpy()
        # both are rounded trajectories of the same exact one: each within its budget of it
        assert trajectory_error(a, b.astype(np.float64), p0, steps) < 2.0
        assert np.abs(b - p0).max() > 0
