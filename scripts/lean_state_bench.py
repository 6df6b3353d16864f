"""Time Adam with lean state (``state_dtype=``) on the host against torch's fused float32 Adam,
bitsandbytes' Adam8bit (when installed) and a same-bytes ceiling per state layout, in one run.

    OMP_WAIT_POLICY=PASSIVE python scripts/lean_state_bench.py [--sizes 20 24] [--repeats 5]

The ceilings move exactly the arrays of one step with no math: float32 p and g with uint8 codes
and a float32 absmax per 256 (int8), or uint16 moments (bfloat16). Each figure is the best of
``--repeats`` steps after one warm-up step. Until ``gpuadam bench`` takes ``--state-dtype``,
this is the measurement BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

import gpuadam

BLOCK = 256


@njit(parallel=True, cache=True)
def _ceiling_int8(p, g, mq, ma, vq, va):
    n_blocks = (p.size + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        for i in range(b * BLOCK, min(p.size, (b + 1) * BLOCK)):
            p[i], mq[i], vq[i] = g[i], vq[i], mq[i] + vq[i]
        ma[b], va[b] = va[b], ma[b] + va[b]


@njit(parallel=True, cache=True)
def _ceiling_bf16(p, g, m, v):
    for i in prange(p.size):
        p[i], m[i], v[i] = g[i], v[i], m[i] + v[i]


def _best(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(n: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(np.float32)
    out = {}
    for state_dtype in (None, "bfloat16", "int8"):
        p = rng.standard_normal(n).astype(np.float32)
        opt = gpuadam.Adam([p], lr=1e-3, state_dtype=state_dtype)
        out[f"gpuadam {state_dtype or 'float32'}"] = _best(lambda opt=opt: opt.step([g]), repeats)
    blocks = -(-n // BLOCK)
    p = np.zeros(n, np.float32)
    codes = [np.zeros(n, np.uint8), np.zeros(blocks, np.float32), np.zeros(n, np.uint8), np.zeros(blocks, np.float32)]
    out["ceiling int8"] = _best(lambda: _ceiling_int8(p, g, *codes), repeats)
    halves = [np.zeros(n, np.uint16), np.zeros(n, np.uint16)]
    out["ceiling bfloat16"] = _best(lambda: _ceiling_bf16(p, g, *halves), repeats)
    try:
        import torch
    except ImportError:
        return out
    tp = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
    tp.grad = torch.from_numpy(g)
    fused = torch.optim.Adam([tp], lr=1e-3, fused=True)
    out["torch fused float32"] = _best(fused.step, repeats)
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    bp = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
    bp.grad = torch.from_numpy(g)
    eight = bnb.optim.Adam8bit([bp], lr=1e-3)
    out["bitsandbytes Adam8bit"] = _best(eight.step, max(1, repeats // 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 24], help="log2 of the element counts")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for log2 in args.sizes:
        times = measure(1 << log2, args.repeats)
        print(f"\n2^{log2} elements: ms per step (best of {args.repeats})")
        for name, ms in times.items():
            print(f"  {name:24s} {ms:9.2f}")
        torch_ms = times.get("torch fused float32")
        for kind in ("int8", "bfloat16"):
            ours = times[f"gpuadam {kind}"]
            line = f"  {kind}: {times[f'ceiling {kind}'] / ours:.0%} of its ceiling"
            if torch_ms:
                line += f", {torch_ms / ours:.2f}x torch fused float32"
            if kind == "int8" and "bitsandbytes Adam8bit" in times:
                line += f", {times['bitsandbytes Adam8bit'] / ours:.1f}x bitsandbytes Adam8bit"
            print(line)


if __name__ == "__main__":
    main()
