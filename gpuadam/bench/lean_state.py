"""Lean optimizer state in the bench (``--state-dtype``): our ``Adam(state_dtype=...).step``,
bitsandbytes' ``Adam8bit`` as a peer, and what verifying a quantised state means.

Verification, per step from the implementation's own state before it (``timing.verify``): the
float64 reference (``gpuadam.reference``) steps from the *dequantised* moments the implementation
holds, so only this step's error is judged:

- ``p`` takes the unrounded moments (ours and bitsandbytes' do): the float32 math budget, as for
  float32 state.
- int8 moments: the reference's new moments are quantised as the definition says
  (``lean_reference.encode_int8``: per block of 256 its absmax, per element the nearest code);
  the implementation's decoded moment may differ from that by one code (the larger of the two gaps
  around the reference's code, times the block's absmax): its float32 moments round a near-tie
  the other way. Each block's absmax is checked on its own (``m_absmax``, ``v_absmax``) at the
  float32 math budget: a wrong scale cannot hide behind the codes' allowance. The sample is whole
  blocks (``problems.make_problem``).
- bitsandbytes' int8 moments: the same, plus 3e-5 of the block's absmax at every element (its CPU
  quantiser is not the nearest code for magnitudes that small; the row's note says so).
- bfloat16 moments (ours round stochastically): within one bfloat16 ulp of the reference's
  unrounded moment, either neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpuadam.bench.cases import Case, Implementation, lean_refusal, lean_unavailable
from gpuadam.bench.ceiling import LeanCeiling
from gpuadam.bench.ours import OursOptimizer, _OptimizerCase
from gpuadam.bench.peers import _TorchCase, import_torch, not_importable
from gpuadam.bench.problems import CPU, GPU, LEAN_STATE, Problem, lean_bytes_per_step, ulp
from gpuadam.kernels.lean_maps import BLOCK, SIGNED, UNSIGNED
from gpuadam.lean_reference import decode_bf16, decode_int8, encode_int8
from gpuadam.reference import adam_reference

#: The moments as the bench names them, with their int8 maps.
MOMENTS = (("m", "exp_avg", SIGNED), ("v", "exp_avg_sq", UNSIGNED))


def one_code_allowance(codes: np.ndarray, absmax: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per element: the larger gap between code ``codes`` and its neighbours in ``table``, times
    the element's block ``absmax`` (per element): one code either way."""
    values = table.astype(np.float64)
    up = values[np.minimum(codes.astype(np.int64) + 1, values.size - 1)] - values[codes]
    down = values[codes] - values[np.maximum(codes.astype(np.int64) - 1, 0)]
    return np.maximum(up, down) * absmax


class LeanVerification(Implementation):
    """The reference and the allowance of a lean layout (see the module's docstring)."""

    #: int8: beyond one code, this fraction of the block's absmax allowed at every element (a
    #: quantiser that is not the nearest code near zero: bitsandbytes' CPU one)
    absmax_floor = 0.0

    def initial(self, problem: Problem, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = super().initial(problem, idx)
        if self.state_dtype == "int8":
            out.update(m_absmax=np.zeros(idx.size), v_absmax=np.zeros(idx.size))
        return out

    def expected_with_allowance(self, problem: Problem, before: dict[str, np.ndarray], g: np.ndarray,
                                t: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        state = {"exp_avg": before["m"], "exp_avg_sq": before["v"]}
        p, state = adam_reference(before["p"], g, state, problem.spec.hyper, t)
        want, allowance = {"p": p}, {}
        for short, name, table in MOMENTS:
            exact = state[name]
            if self.state_dtype == "bfloat16":
                want[short] = exact
                allowance[short] = ulp(exact, "bfloat16")
                continue
            # the sample is whole blocks in order (the last may be a tensor's short tail): blocks
            # of the sample are blocks of the tensor
            codes, absmax = encode_int8(exact, table)
            scale = np.repeat(absmax.astype(np.float64), BLOCK)[: exact.size]
            want[short] = decode_int8(codes, absmax, table)
            want[f"{short}_absmax"] = scale
            allowance[short] = one_code_allowance(codes, scale, table) + self.absmax_floor * scale
        return want, allowance


def decoded_int8(codes: np.ndarray, absmax: np.ndarray, table: np.ndarray, short: str) -> dict[str, np.ndarray]:
    """An int8 moment as verification reads it: decoded (float64) and its absmax per element."""
    codes = np.asarray(codes).reshape(-1)
    absmax = np.asarray(absmax, np.float32).reshape(-1)
    return {short: decode_int8(codes, absmax, table), f"{short}_absmax": np.repeat(absmax, BLOCK)[: codes.size]}


class OursLean(LeanVerification, OursOptimizer):
    """``gpuadam.Adam``/``AdamW(state_dtype=kind)`` and ``opt.step(grads)``."""

    def __init__(self, backend: str, kind: str) -> None:
        OursOptimizer.__init__(self, backend)
        self.state_dtype = kind
        self.name = f"gpuadam {backend} Adam(state_dtype={kind}).step"

    def unavailable(self, problem: Problem) -> str | None:
        return lean_unavailable(problem, self.state_dtype) or lean_refusal(self.backend, self.state_dtype)

    def bytes_per_step(self, problem: Problem) -> int:
        return lean_bytes_per_step(self.state_dtype, problem.sizes)

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OursLeanCase(self.backend, problem, sets, self.state_dtype)


class _OursLeanCase(_OptimizerCase):
    def __init__(self, backend: str, problem: Problem, sets: int, kind: str) -> None:
        self.state_dtype = kind  # before the optimizers are made
        super().__init__(backend, problem, sets)

    def state(self) -> dict[str, np.ndarray]:
        (state,) = self.opts[0].state
        host = {name: self.be.to_host(a) for name, a in state.items()}
        out = {"p": self._host(self.params[0])}
        for short, name, table in MOMENTS:
            if self.state_dtype == "int8":
                out.update(decoded_int8(host[f"{name}_codes"], host[f"{name}_absmax"], table, short))
            else:
                out[short] = decode_bf16(host[f"{name}_bf16_bits"])
        return out


class BitsandbytesPeer(LeanVerification):
    """bitsandbytes' ``Adam8bit``/``AdamW8bit``: blockwise 8-bit moments (256 per block), on torch
    tensors, CPU or CUDA."""

    backend = "bitsandbytes"
    state_dtype = "int8"
    launches = "per tensor"
    # Its CPU quantiser sends magnitudes under ~3e-5 of the block's absmax to small nonzero codes
    # (up to 2.25e-5 of the absmax away, several codes), not the nearest (tests/test_lean_state.py).
    absmax_floor = 3e-5
    note = ("int8 moments checked at one code of the nearest-code quantisation of the reference plus 3e-5 of "
            "the block's absmax: its CPU quantiser sends magnitudes under ~3e-5 of the absmax to small nonzero codes")

    def __init__(self, device: str) -> None:
        self.torch_device = device
        self.device = CPU if device == "cpu" else GPU
        self.name = f"bitsandbytes Adam8bit ({device})"

    def unavailable(self, problem: Problem) -> str | None:
        try:
            import bitsandbytes  # noqa: F401

            torch = import_torch()
        except Exception as exc:
            return not_importable("bitsandbytes", exc)
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return "torch has no CUDA device here"
        why = lean_unavailable(problem, "int8")
        if why:
            return why
        h = problem.spec.hyper
        if h.maximize or h.eps_root or not h.bias_correction:
            return "Adam8bit has no maximize or eps_root and always corrects the bias"
        return None

    def bytes_per_step(self, problem: Problem) -> int:
        return lean_bytes_per_step("int8", problem.sizes)

    def setup(self, problem: Problem, sets: int) -> Case:
        return _BitsandbytesCase(self, problem, sets)


class _BitsandbytesCase(_TorchCase):
    def optimizer(self, impl: Implementation, params: list) -> Any:
        import bitsandbytes as bnb

        h = self.problem.spec.hyper
        cls = bnb.optim.AdamW8bit if h.decoupled_weight_decay else bnb.optim.Adam8bit
        return cls(params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay)

    def state(self) -> dict[str, np.ndarray]:
        (param,) = self.params[0]
        state = self.opts[0].state[param]

        def host(key: str) -> np.ndarray:
            return state[key].detach().cpu().numpy()

        out = {"p": param.detach().cpu().numpy().reshape(-1)}
        for j, (short, _, _) in enumerate(MOMENTS, start=1):
            # decoded with bitsandbytes' own map (ours is built to equal it)
            out.update(decoded_int8(host(f"state{j}"), host(f"absmax{j}"), host(f"qmap{j}"), short))
        return out


def lean_implementations(state_dtypes: Sequence[str], backends: Sequence[str], devices: set[str],
                         peers: bool) -> list[Implementation]:
    """Per lean layout of ``state_dtypes``: its ceiling and our step on each backend (each says
    itself unavailable where the optimizer refuses that backend), and bitsandbytes' Adam8bit on the
    devices benchmarked with int8 when ``peers``."""
    out: list[Implementation] = []
    for kind in (s for s in state_dtypes if s in LEAN_STATE):
        for b in backends:
            out += [LeanCeiling(b, kind), OursLean(b, kind)]
        if kind == "int8" and peers:
            out += [BitsandbytesPeer("cpu" if d == CPU else "cuda") for d in sorted(devices)]
    return out
