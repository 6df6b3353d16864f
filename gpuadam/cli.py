"""The ``gpuadam`` command: ``info``, ``inspect`` (and ``bench``, ``demo`` where installed)."""

from __future__ import annotations

import argparse
import json
import sys

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
        head = f"{'backend':11s} {'kernel':8s} {'dtype':8s} {'arch':6s} {'regs':>4s} {'spill':>5s} " \
               f"{'local':>5s} {'f64':>4s} {'ld/elem':>7s} {'st/elem':>7s}  occupancy"
        print(head)
        for r in reports:
            print(f"{r.backend:11s} {r.kernel:8s} {r.dtype:8s} {r.arch:6s} {r.registers:4d} "
                  f"{r.spill_bytes:5d} {r.local_bytes:5d} {r.f64_ops:4d} {r.loads_per_element:7d} "
                  f"{r.stores_per_element:7d}  {'full' if r.full_occupancy else 'partial'}")
        for p in problems:
            print(f"not inspected: {p}", file=sys.stderr)
    return 1 if problems and not reports else 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
