"""The ``gpuadam`` command: ``info``, ``inspect`` (and ``bench``, ``demo`` where installed)."""

from __future__ import annotations

import argparse
import json
import sys

from gpuadam import demo
from gpuadam.backends import available_backends


def _info(args: argparse.Namespace) -> int:
    for name, st in available_backends().items():
        print(f"{name:11s} {'available' if st.available else 'unavailable':11s} {st.reason}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from gpuadam.machine_code import inspect_kernels

    reports, problems = inspect_kernels(args.arch, args.ptx_dir)
    if args.json:
        print(json.dumps({"kernels": [r.as_dict() for r in reports], "problems": problems}, indent=2))
    else:
        width = max([26] + [len(r.kernel) for r in reports])  # the longest kernel name
        head = f"{'backend':11s} {'kernel':{width}s} {'dtype':8s} {'arch':6s} {'regs':>4s} {'spill':>5s} " \
               f"{'local':>5s} {'f64':>4s} {'ld/elem':>7s} {'st/elem':>7s}  occupancy"
        print(head)
        for r in reports:
            print(f"{r.backend:11s} {r.kernel:{width}s} {r.dtype:8s} {r.arch:6s} {r.registers:4d} "
                  f"{r.spill_bytes:5d} {r.local_bytes:5d} {r.f64_ops:4d} {r.loads_per_element:7d} "
                  f"{r.stores_per_element:7d}  {'full' if r.full_occupancy else 'partial'}")
        for p in problems:
            print(f"not inspected: {p}", file=sys.stderr)
    return 1 if problems and not reports else 0


def _bench(args: argparse.Namespace) -> int:
    import os

    # Before numba, torch or jax load an OpenMP runtime (libgomp reads this once, at load): two
    # runtimes whose idle threads spin steal each other's cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gpuadam import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuadam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="which backends can run here, and why not")
    p.set_defaults(func=_info)
    p = sub.add_parser("inspect", help="compile every GPU kernel for real and report its machine code")
    p.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--ptx-dir", help="also write each kernel's PTX into this folder")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("demo", help="train a two-headed classifier with each optimizer: table and loss curves")
    demo.add_arguments(p)
    p.set_defaults(func=demo.main)
    p = sub.add_parser("bench", help="time the kernels against the same-bytes ceiling and the peers",
                       description="Time every backend's Adam step against a kernel that moves the same bytes with "
                                   "no math, and against NumPy, PyTorch, optax and DeepSpeed where installed.")
    _bench_arguments(p)
    p.set_defaults(func=_bench)
    return parser


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", help="elements per tensor, comma-separated: 2^16,2^20,1000000 "
                                   "(default 2^16,2^20,2^24; with --quick 2^12,2^16)")
    p.add_argument("--backends", help="comma-separated numba-cpu,numba-cuda,cupy (default: every available one)")
    p.add_argument("--optimizers", default="adam", help="comma-separated adam,adamw,amsgrad (default adam)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="the params' dtype (default float32); float16/bfloat16 keep half state and compute "
                        "in float32, as torch does")
    p.add_argument("--master-weights", action="store_true",
                   help="with --dtype float16/bfloat16: float32 master weights and state (28 B/element for Adam)")
    p.add_argument("--many", action="store_true",
                   help="400 tensors of 1e3-1e5 elements: one tensor vs separate arrays vs a FlatBuffer vs the "
                        "peers (the size sweep then runs only if --sizes is given)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time NumPy, PyTorch, optax, DeepSpeed where installed (default on)")
    p.add_argument("--repeat", type=int, help="timed samples per implementation (default 7; --quick 3)")
    p.add_argument("--min-time", type=float, help="seconds per timed sample (default 0.02; --quick 0.002)")
    p.add_argument("--max-buffer-sets", type=int, help="GPU: at most this many buffer sets rotated (default 64)")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-step host overhead rows")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PATH", help="write bandwidth against size as a PNG")
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few repeats")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
