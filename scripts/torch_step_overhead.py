"""Host overhead of one optimizer step: ``gpuadam.torch.Adam`` (params as they are, and flattened by
``flatten_parameters``: one launch) vs ``torch.optim.Adam`` (fused, and foreach=False) on 100 float32
params of 64 elements, CPU, one thread each.

Interleaved blocks in alternating order; prints the median microseconds per step and the ratios.
Run: ``NUMBA_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/torch_step_overhead.py``.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import torch  # noqa: E402

import gpuadam.torch as gt  # noqa: E402

PARAMS, SIZE, BLOCKS, STEPS = 100, 64, 21, 50


def make(kind: str) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(SIZE, generator=gen).requires_grad_() for _ in range(PARAMS)]
    for p in params:
        p.grad = torch.randn(SIZE, generator=gen) * 1e-3
    if kind == "ours":
        return gt.Adam(params, lr=1e-3)
    if kind == "ours flattened":
        gt.flatten_parameters(params)  # keeps the values and the grads, now views of one buffer
        return gt.Adam(params, lr=1e-3)
    if kind == "fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    return torch.optim.Adam(params, lr=1e-3, foreach=False)


def block(opt: torch.optim.Optimizer) -> float:
    t = time.perf_counter()
    for _ in range(STEPS):
        opt.step()
    return (time.perf_counter() - t) / STEPS * 1e6


def main() -> None:
    torch.set_num_threads(1)
    kinds = ["ours", "ours flattened", "fused", "foreach=False"]
    opts = {k: make(k) for k in kinds}
    for opt in opts.values():  # warm up: compile, first-step state
        block(opt)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for b in range(BLOCKS):
        for k in (kinds if b % 2 == 0 else kinds[::-1]):
            times[k].append(block(opts[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in kinds:
        print(f"{k:>14}: {med[k]:8.1f} us/step  ({med[k] / PARAMS:.2f} us/param)")
    print(f"ours / fused = {med['ours'] / med['fused']:.2f}   "
          f"ours flattened / fused = {med['ours flattened'] / med['fused']:.2f}   "
          f"ours / foreach=False = {med['ours'] / med['foreach=False']:.2f}")


if __name__ == "__main__":
    main()
