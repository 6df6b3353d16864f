"""``gpuadam demo --framework torch``: the demo's two-headed classifier as a torch ``nn.Module``.

The same network, initialisation, batches and contenders as ``gpuadam.demo``, but the forward and
backward pass are torch's (autograd) and each contender is the ``gpuadam.torch`` class of the same
name, the drop-in for ``torch.optim``. The model's params are flattened (``flatten_parameters``), so
each step is one fused launch; the gradients are zeroed in place (``zero_grad(set_to_none=False)``).
CPU tensors with the numba-cpu backend, CUDA tensors with numba-cuda or cupy.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

import gpuadam
import gpuadam.torch as gt

NAMES = ("w1", "b1", "w_item", "b_item", "w_domain", "b_domain")


class TwoHeadedModule(torch.nn.Module):
    """``h = relu(x W1 + b1)``; ``item = h W_item + b_item``; ``domain = h W_domain + b_domain``:
    the params of ``init`` (in ``gpuadam.demo.shapes`` order), copied to ``device``."""

    def __init__(self, init: list[np.ndarray], device: str) -> None:
        super().__init__()
        for name, value in zip(NAMES, init):
            self.register_parameter(name, torch.nn.Parameter(torch.tensor(value, device=device)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(x @ self.w1 + self.b1)
        return h @ self.w_item + self.b_item, h @ self.w_domain + self.b_domain

    def loss(self, x: torch.Tensor, item: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """``L = L_item + L_domain``, two mean cross-entropies."""
        zi, zd = self(x)
        return torch.nn.functional.cross_entropy(zi, item) + torch.nn.functional.cross_entropy(zd, domain)


def resolve_backend(requested: str) -> tuple[str, str]:
    """``(backend, torch device)``; ValueError saying why when ``requested`` cannot run here."""
    status = gpuadam.available_backends()
    gpu = [n for n in ("numba-cuda", "cupy") if status[n].available]
    if requested == "auto":
        requested = gpu[0] if gpu and torch.cuda.is_available() else "numba-cpu"
    if not status[requested].available:
        raise ValueError(f"got {requested!r}, which cannot run here ({status[requested].reason})")
    if requested == "numba-cpu":
        return requested, "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"got {requested!r}, but torch sees no CUDA device here; expected numba-cpu or auto")
    return requested, "cuda"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_one(contender: Any, config: Any, backend: str, data: dict[str, Any], init: list[np.ndarray],
              schedule: np.ndarray, progress: bool) -> dict[str, Any]:
    """Train ``contender`` (a ``gpuadam.demo.Contender``) on host ``data`` as the NumPy demo does;
    the measurements ``gpuadam.demo.result_row`` makes a row of, plus ``iteration_us_median``
    (forward, backward and step)."""
    from tqdm import tqdm

    backend, device = resolve_backend(backend)
    model = TwoHeadedModule(init, device)
    gt.flatten_parameters(model)
    opt = getattr(gt, contender.class_name)(model.parameters(), backend=backend, **contender.kwargs)
    x, item, domain = (torch.as_tensor(a, device=device) for a in data["train"])
    batches = torch.as_tensor(schedule, device=device)
    losses: list[float] = []
    step_ns: list[int] = []
    iteration_ns: list[int] = []
    diverged = False
    bar = tqdm(range(len(schedule)), desc=f"{contender.label:8s}", unit="step", disable=not progress, leave=True)
    for t in bar:
        start = time.perf_counter_ns()
        idx = batches[t]
        opt.zero_grad(set_to_none=False)
        loss = model.loss(x[idx], item[idx], domain[idx])
        loss.backward()
        _sync(device)
        stepping = time.perf_counter_ns()
        opt.step()
        _sync(device)  # on a GPU, the kernel's run time too, not only its launch
        end = time.perf_counter_ns()
        step_ns.append(end - stepping)
        iteration_ns.append(end - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        if t % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    with torch.no_grad():
        final = float(model.loss(x, item, domain))
        xt, it, dt = (torch.as_tensor(a, device=device) for a in data["test"])
        zi, zd = model(xt)
    return {
        "diverged": diverged,
        "final": final,
        "item_accuracy": float((zi.argmax(1) == it).double().mean()),
        "domain_accuracy": float((zd.argmax(1) == dt).double().mean()),
        "curve": losses,
        "step_us_median": float(np.median(step_ns)) / 1e3,
        "iteration_us_median": float(np.median(iteration_ns)) / 1e3,
        "launches_per_step": opt.last_step_launches,
        "state_bytes": sum(t.numel() * t.element_size() for state in opt.state.values() for name, t in state.items()
                           if torch.is_tensor(t) and name != "step"),
    }
