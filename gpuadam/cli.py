"""The ``gpuadam`` command: ``info``, ``inspect``, ``bench`` and ``demo``.

Every error a user can cause is one line on stderr, ``gpuadam COMMAND: --flag: got X; expected Y``,
and exit status 2, as argparse's own; each check runs before any long work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from gpuadam import __version__, demo
from gpuadam.backends import ENV_VAR, NAMES, available_backends
from gpuadam.outputs import check_output_dir

DESCRIPTION = (
    "Fused, in-place optimizer steps (Adam and its family) on Numba CUDA, CuPy and Numba CPU. "
    "info: which backends run here; inspect: the GPU kernels' machine code; bench: time the step "
    "against the same-bytes ceiling and the peers; demo: train a small classifier with each optimizer."
)


def fail(command: str, message: str) -> int:
    """Print ``gpuadam COMMAND: message`` on stderr, one line; the exit status of a usage error."""
    print(f"gpuadam {command}: {message}", file=sys.stderr)
    return 2


def auto_choice(statuses: dict) -> str:
    """What ``backend="auto"`` picks here, for host and for device arrays (``backends.choose``'s rule)."""
    gpu = next((n for n in ("numba-cuda", "cupy") if statuses[n].available), "nothing here (no GPU backend runs)")
    return f"auto picks numba-cpu for NumPy arrays; for CUDA device arrays {gpu}"


def _info(args: argparse.Namespace) -> int:
    statuses = available_backends()
    for name, st in statuses.items():
        print(f"{name:11s} {'available' if st.available else 'unavailable':11s} {st.reason}")
    forced = os.environ.get(ENV_VAR, "")
    if forced in ("", "auto"):
        print(auto_choice(statuses))
        return 0
    if forced not in NAMES:
        return fail("info", f"${ENV_VAR}: got {forced!r}; expected one of {', '.join(NAMES)} or auto "
                            "(every optimizer refuses this value)")
    state = "" if statuses[forced].available else f", which cannot run here ({statuses[forced].reason})"
    print(f"${ENV_VAR}={forced}: every optimizer without backend= uses {forced}{state}")
    return 0


def _inspect_progress() -> Callable[[int, int, str], None] | None:
    """A one-line progress report on stderr when it is a terminal (a log gets none)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, label: str) -> None:
        text = f"gpuadam inspect: {done}/{total} {label}" if done < total else ""
        print(f"\r{text:78.78s}\r" if text else f"\r{'':78s}\r", end="", file=sys.stderr, flush=True)

    return show


def _inspect(args: argparse.Namespace) -> int:
    from gpuadam import machine_code

    missing = machine_code.missing_requirements()
    if missing is not None:
        return fail("inspect", missing)
    try:
        machine_code.check_arch(args.arch)
        if args.ptx_dir is not None:
            check_output_dir("--ptx-dir", args.ptx_dir)
    except ValueError as exc:
        return fail("inspect", str(exc))
    patterns = [p for p in args.kernels.split(",") if p] if args.kernels is not None else None
    reports, problems = machine_code.inspect_kernels(args.arch, args.ptx_dir, _inspect_progress(), patterns)
    if not reports and not problems:
        return fail("inspect", f"--kernels: got {args.kernels!r}, which matches no kernel; names look like "
                               "adam, adam/device-constants, adam/master, nadam/int8, adam/bf16state/stochastic "
                               "(globs: '*int8*', 'radam/*')")
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
        notes = {r.kernel.removesuffix(machine_code.DEVICE_CONSTANTS): r.note for r in reports if r.note}
        for kernel, note in notes.items():
            print(f"{kernel}: {note}")
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
    parser = argparse.ArgumentParser(prog="gpuadam", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gpuadam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="which backends can run here, and why not",
                       description="List every backend, whether it runs here and why not, and what "
                                   f"backend='auto' (or ${ENV_VAR}) picks.")
    p.set_defaults(func=_info)
    p = sub.add_parser("inspect", help="compile every GPU kernel for real and report its machine code",
                       description="Compile every GPU kernel (Numba's with libNVVM, CuPy's with NVRTC) and "
                                   "assemble it with ptxas: registers, spills, local memory, float64 "
                                   "instructions, global loads/stores per element. No GPU needed; needs "
                                   "pip install 'gpuadam[inspect]'.")
    p.add_argument("--arch", default="sm_90", help="target architecture, sm_XY (default sm_90)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--ptx-dir", help="also write each kernel's PTX into this folder")
    p.add_argument("--kernels", help="only the kernels whose name matches one of these comma-separated shell "
                                     "globs, e.g. 'adam,*int8*' (default: every kernel)")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("demo", help="train a two-headed classifier with each optimizer: table and loss curves",
                       description="Train a two-headed classifier (digit and domain) with SGD, Momentum, "
                                   "RMSprop, AdaGrad, Adam and AdamW from one initialisation; print a table, "
                                   "write the loss curves. Needs pip install 'gpuadam[demo]'.")
    demo.add_arguments(p)
    p.set_defaults(func=demo.main)
    p = sub.add_parser("bench", help="time the kernels against the same-bytes ceiling and the peers",
                       description="Time every backend's Adam step against a kernel that moves the same bytes with "
                                   "no math, and against NumPy, PyTorch, optax, DeepSpeed and bitsandbytes where "
                                   "installed.")
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
    p.add_argument("--state-dtype", default="float32",
                   help="comma-separated float32,bfloat16,int8: the optimizer state's layouts in the size sweep "
                        "(default float32, the params' own). Each lean one adds Adam(state_dtype=...).step on "
                        "every backend that takes it and a ceiling moving that layout's bytes; int8 also "
                        "bitsandbytes' Adam8bit where installed. Lean state takes --dtype float32, adam/adamw")
    p.add_argument("--many", action="store_true",
                   help="400 tensors of 1e3-1e5 elements: one tensor vs separate arrays vs a FlatBuffer vs the "
                        "peers (the size sweep then runs only if --sizes is given)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time NumPy, PyTorch, optax, DeepSpeed (with int8 state bitsandbytes) where installed "
                        "(default on)")
    p.add_argument("--repeat", type=int, help="timed samples per implementation and round (default 5; --quick 3)")
    p.add_argument("--rounds", type=int,
                   help="rounds of fresh allocations, each with another implementation allocating first; "
                        "the spread of their medians is reported (default 3; --quick 1)")
    p.add_argument("--min-time", type=float, help="seconds per timed sample (default 0.02; --quick 0.002)")
    p.add_argument("--max-buffer-sets", type=int, help="GPU: at most this many buffer sets rotated (default 64)")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-step host overhead rows")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PATH", help="write bandwidth against size as a PNG")
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few repeats")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (there is none when stderr is not a terminal)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
