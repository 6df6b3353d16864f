"""An independent timing harness for one optimizer step, as a training loop sees it.

It shares no code with ``gpuadam bench``: it times ``gpuadam.Adam.step``, a same-bytes kernel of
its own (``p, m, v = g, p, m + v``, the arrays of an Adam step and no math) and
``torch.optim.Adam(fused=True)`` interleaved in one process, one step per sample, the order
alternating every repetition, so each contestant runs after each other one as often as before it.
The arrays are allocated as a user's would be (NumPy's ``standard_normal``, then the optimizer's own
state), in the order ``--order`` gives; each array's offset from a 64-byte cache line is printed.

    OMP_WAIT_POLICY=PASSIVE python scripts/harness_step.py [--size 2^24] [--reps 40]
        [--order ours,same-bytes,torch] [--aligned] [--json out.json]

Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment: OpenMP reads it once, when it loads, and two
runtimes whose idle threads spin steal each other's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from numba import njit, prange

CONTESTANTS = ("ours", "same-bytes", "torch")


@njit(parallel=True, cache=True)
def _same_bytes(p, g, m, v):  # pragma: no cover - compiled
    for i in prange(p.size):
        p[i], m[i], v[i] = g[i], p[i], m[i] + v[i]


def _address(a: object) -> tuple[int, int]:
    """(data address, bytes) of a NumPy array or a torch tensor."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data, a.nbytes
    return a.data_ptr(), a.numel() * a.element_size()


def _offset(a: object) -> int:
    """Bytes past a 64-byte line of a NumPy array's or a torch tensor's data."""
    return _address(a)[0] % 64


def huge_page_share(a: object) -> float | None:
    """The share of the memory mapping holding ``a`` that transparent huge pages back (Linux),
    from /proc/self/smaps; None where that file cannot be read. Adjacent mappings the kernel merged
    count together."""
    ptr, _ = _address(a)
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    size = 0
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
            size = hi - lo
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024 / size
    return None


def _line_aligned(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` starting on a 64-byte line (NumPy starts a large array 16 bytes past one)."""
    raw = np.empty(x.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + x.nbytes].view(x.dtype)
    out[...] = x
    return out


def make(name: str, n: int, rng: np.random.Generator,
         aligned: bool = False) -> tuple[Callable[[], None], dict[str, object]]:
    """A step function for contestant ``name`` on fresh ``n``-element float32 arrays, and its
    arrays by name (p, g, m, v). ``aligned``: the arrays this harness allocates start on a line."""
    place = _line_aligned if aligned else (lambda x: x)
    p = place(rng.standard_normal(n, dtype=np.float32))
    g = place(rng.standard_normal(n, dtype=np.float32))
    if name == "ours":
        import gpuadam

        opt = gpuadam.Adam([p], lr=1e-3)
        opt.step([g])  # the state exists, and its pages are touched, before the first sample

        def step() -> None:
            opt.step([g])

        state = opt.state[0]
        return step, {"p": p, "g": g, "m": state["exp_avg"], "v": state["exp_avg_sq"]}
    if name == "same-bytes":
        m = place(rng.standard_normal(n, dtype=np.float32))
        v = place(np.abs(rng.standard_normal(n, dtype=np.float32)))
        _same_bytes(p, g, m, v)

        def step() -> None:
            _same_bytes(p, g, m, v)

        return step, {"p": p, "g": g, "m": m, "v": v}
    if name == "torch":
        import torch

        t = torch.nn.Parameter(torch.from_numpy(p))
        t.grad = torch.from_numpy(g)
        opt = torch.optim.Adam([t], lr=1e-3, fused=True)
        opt.step()
        state = opt.state[t]
        return opt.step, {"p": t, "g": t.grad, "m": state["exp_avg"], "v": state["exp_avg_sq"]}
    raise ValueError(f"--order: got {name!r}; expected some of {', '.join(CONTESTANTS)}")


def parse_size(text: str) -> int:
    base, _, exp = text.partition("^")
    return int(base) ** int(exp) if exp else int(float(text))


def run(size: int, reps: int, order: list[str], seed: int = 0, aligned: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    steps, held = {}, {}
    for name in order:  # allocation order: the first gets the fresh pages
        steps[name], held[name] = make(name, size, rng, aligned)
    offsets = {name: {k: _offset(a) for k, a in arrays.items()} for name, arrays in held.items()}
    samples: dict[str, list[float]] = {name: [] for name in order}
    for r in range(reps):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - t0)
    out = {"size": size, "reps": reps, "order": order, "aligned": aligned, "offsets": offsets, "results": {}}
    for name, xs in samples.items():
        out["results"][name] = {"min_ms": min(xs) * 1e3, "median_ms": statistics.median(xs) * 1e3}
    out["huge_pages"] = {name: {k: huge_page_share(a) for k, a in arrays.items()}
                         for name, arrays in held.items()}
    if "ours" in samples and "torch" in samples:
        out["torch_over_ours_median"] = out["results"]["torch"]["median_ms"] / out["results"]["ours"]["median_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2^24", help="float32 elements (default 2^24)")
    parser.add_argument("--reps", type=int, default=40, help="samples per contestant (default 40)")
    parser.add_argument("--order", default=",".join(CONTESTANTS),
                        help="contestants in allocation order (default ours,same-bytes,torch)")
    parser.add_argument("--aligned", action="store_true",
                        help="start the params, grads and the same-bytes kernel's arrays on a 64-byte line "
                             "(default: as NumPy allocates them)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    order = [x.strip() for x in args.order.split(",") if x.strip()]
    bad = [x for x in order if x not in CONTESTANTS]
    if bad or not order:
        print(f"harness_step: --order: got {args.order!r}; expected some of {', '.join(CONTESTANTS)}",
              file=sys.stderr)
        return 2
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        print("harness_step: note: OMP_WAIT_POLICY is not PASSIVE; the figures may be skewed", file=sys.stderr)
    out = run(parse_size(args.size), args.reps, order, aligned=args.aligned)
    for name, r in out["results"].items():
        thp = ", ".join(f"{k} {'-' if x is None else f'{100 * x:.0f}%'}" for k, x in out["huge_pages"][name].items())
        offsets = ", ".join(f"{k} {x}" for k, x in out["offsets"][name].items())
        print(f"{name:11s} min {r['min_ms']:7.3f} ms  median {r['median_ms']:7.3f} ms  "
              f"bytes past a 64-B line: {offsets}; huge pages: {thp}")
    if "torch_over_ours_median" in out:
        print(f"torch fused / ours (median): {out['torch_over_ours_median']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
