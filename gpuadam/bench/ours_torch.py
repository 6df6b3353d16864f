"""``gpuadam.torch.Adam.step`` in the benchmark: our kernel behind torch's optimizer API, on torch
tensors; beside torch's own rows, its host overhead is what a torch user pays for ours."""

from __future__ import annotations

from typing import Any

from gpuadam.bench.cases import Case
from gpuadam.bench.peers import TorchPeer, _TorchCase, import_torch, not_importable
from gpuadam.bench.problems import Problem, adam_kwargs


class OursTorch(TorchPeer):
    """``gpuadam.torch.Adam`` on the problem's tensors, one step per ``opt.step()``."""

    group = "ours"

    def __init__(self, device: str) -> None:
        super().__init__("fused", device)
        self.name = f"gpuadam.torch Adam.step ({device})"
        self.launches = "per tensor"
        self.half_arithmetic = False

    def unavailable(self, problem: Problem) -> str | None:
        try:
            torch = import_torch()
        except Exception as exc:
            return not_importable("torch", exc)
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return "torch has no CUDA device here"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OursTorchCase(self, problem, sets)


class _OursTorchCase(_TorchCase):
    def optimizer(self, impl: TorchPeer, params: list) -> Any:
        import gpuadam.torch as gt

        # gpuadam.torch.Adam takes decoupled_weight_decay (AdamW is Adam with it) and our extras
        return gt.Adam(params, master_weights=self.problem.master, **adam_kwargs(self.problem.spec.hyper))
