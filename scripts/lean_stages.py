"""Where the CPU int8-state step spends its time: one thread, in cache, per element.

Times the whole int8 block loop (``lean_cpu``'s serial kernel), its two storage stages alone
(``dequantize_block`` and ``quantize_block`` over every block, both moments, with the kernel's own
helpers), and, for scale, the float32 Adam loop (``numba_cpu``'s serial kernel) and the
bfloat16-state loops. The update's share is the whole minus the two stages (the requantising
stage reads its moments from whole arrays, in L2, where the kernel's come from a block of scratch
in L1). Best of ``--repeat``
timings of ``--inner`` calls each; the figures in BENCHMARKS.md ("Lean state") come from it.

    python scripts/lean_stages.py [--size 65536] [--repeat 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit

import gpuadam
from gpuadam.hyper import AdamHyper
from gpuadam.kernels import lean_cpu, lean_maps, numba_cpu
from gpuadam.kernels.lean_maps import BLOCK, SIGNED_ESTIMATE, UNSIGNED_ESTIMATE

MAPS = (lean_maps.SIGNED, lean_maps.SIGNED_BUCKETS, lean_maps.SIGNED_THRESHOLDS,
        lean_maps.UNSIGNED, lean_maps.UNSIGNED_BUCKETS, lean_maps.UNSIGNED_THRESHOLDS)


@njit(error_model="numpy")
def dequantize_all(mq, ma, vq, va, m, v, smap, umap):
    """Into one block of scratch per moment, as the kernel does (``m``, ``v``: ``BLOCK`` elements;
    the maps passed in, as the kernel gets them)."""
    for b in range((mq.size + BLOCK - 1) // BLOCK):
        s, e = b * BLOCK, min(mq.size, (b + 1) * BLOCK)
        lean_cpu.dequantize_block(mq[s:e], smap, ma[b], m[: e - s])
        lean_cpu.dequantize_block(vq[s:e], umap, va[b], v[: e - s])


@njit(error_model="numpy")
def quantize_all(m, ma, v, va, mq, vq, sb, st, ub, ut):
    unsure = np.empty(BLOCK, np.uint8)
    for b in range((m.size + BLOCK - 1) // BLOCK):
        s, e = b * BLOCK, min(m.size, (b + 1) * BLOCK)
        lean_cpu.quantize_block(m[s:e], ma[b], SIGNED_ESTIMATE, sb, st, mq[s:e], unsure[: e - s])
        lean_cpu.quantize_block(v[s:e], va[b], UNSIGNED_ESTIMATE, ub, ut, vq[s:e], unsure[: e - s])


def best(f, repeat: int, inner: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            f()
        times.append((time.perf_counter() - t) / inner)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 16, help="elements (default 65536: in cache)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.size
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    opt = gpuadam.Adam([p], lr=1e-3, state_dtype="int8")
    for _ in range(3):  # a state of real codes and absmax
        opt.step([rng.standard_normal(n).astype(np.float32)])
    s = opt.state[0]
    mq, ma, vq, va = (s[k] for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"))
    g = rng.standard_normal(n).astype(np.float32)
    c = AdamHyper.from_kwargs(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                              maximize=False, eps_root=0.0, bias_correction=True,
                              decoupled_weight_decay=False).constants(4, np.float32, 1.0)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    for k in range(0, n, BLOCK):  # the moments to requantise: the state's own values
        dequantize_all(mq[k:k + BLOCK], ma[k // BLOCK:], vq[k:k + BLOCK], va[k // BLOCK:], m[k:], v[k:], MAPS[0],
                       MAPS[3])
    m_block, v_block = np.zeros(BLOCK, np.float32), np.zeros(BLOCK, np.float32)
    half = np.zeros(0, np.uint16)
    m16, v16 = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    bf16 = lean_cpu.KERNELS["adam/bf16state"].variants
    timed = {
        "int8 block loop (whole)": lambda: lean_cpu.KERNELS["adam/int8"].serial(p, g, mq, ma, vq, va, c, *MAPS, 0,
                                                                                  half),
        "int8 dequantise, both moments": lambda: dequantize_all(mq, ma, vq, va, m_block, v_block, MAPS[0], MAPS[3]),
        "int8 requantise, both moments": lambda: quantize_all(m, ma, v, va, mq, vq, MAPS[1], MAPS[2], MAPS[4],
                                                               MAPS[5]),
        "float32 Adam loop": lambda: numba_cpu.KERNELS["adam"].serial(p, g, m, v, c),
        "bfloat16 state, stochastic": lambda: bf16[True][1](p, g, m16, v16, c, (1, 1, 2), 0, half),
        "bfloat16 state, nearest": lambda: bf16[False][1](p, g, m16, v16, c, (0, 0, 0), 0, half),
    }
    ns = {name: best(f, args.repeat, args.inner) * 1e9 / n for name, f in timed.items()}
    ns["int8 update and absmax (whole - both stages)"] = (ns["int8 block loop (whole)"]
                                                          - ns["int8 dequantise, both moments"]
                                                          - ns["int8 requantise, both moments"])
    print(f"ns per element, one thread, {n} elements")
    for name, t in ns.items():
        print(f"  {name:46s} {t:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
