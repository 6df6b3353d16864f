"""``gpuadam bench``: arguments to ``Config``, then run, print, write."""

from __future__ import annotations

import sys
from typing import Any

from gpuadam import backends
from gpuadam.bench.problems import parse_sizes
from gpuadam.bench.report import format_table, plot, write_json
from gpuadam.bench.suite import Config, run
from gpuadam.outputs import check_importable, check_output_file


def config_from_args(args: Any) -> Config:
    """A ``Config`` from the ``gpuadam bench`` arguments (``--quick`` changes the defaults only)."""
    split = (lambda s: tuple(x.strip() for x in s.split(",") if x.strip()))  # noqa: E731
    kw: dict[str, Any] = dict(
        optimizers=split(args.optimizers), dtype=args.dtype, master_weights=args.master_weights,
        state_dtypes=split(args.state_dtype),
        many=args.many, peers=args.peers,
        overhead=not args.no_overhead, progress=not args.no_progress,
        sweep=args.sizes is not None or not args.many,
    )
    if args.sizes is not None:
        kw["sizes"] = parse_sizes(args.sizes)
    if args.backends:
        kw["backends"] = split(args.backends)
    for name, attr in (("repeat", "repeat"), ("rounds", "rounds"), ("min_time", "min_time"),
                       ("max_buffer_sets", "max_sets")):
        if getattr(args, name) is not None:
            kw[attr] = getattr(args, name)
    config = Config.quick_defaults(**kw) if args.quick else Config(**kw)
    config.check()
    return config


def check_before_running(config: Config, args: Any) -> None:
    """Everything that would otherwise fail after the benchmark has run, as a one-line ValueError:
    a requested backend that cannot run here, the plot's matplotlib, the output paths."""
    if config.backends is not None:
        statuses = backends.available_backends()
        down = [f"{b} cannot run here ({statuses[b].reason})" for b in config.backends if not statuses[b].available]
        if down:
            usable = [n for n in backends.NAMES if statuses[n].available]
            raise ValueError(f"--backends: {'; '.join(down)}; expected some of {', '.join(usable)}")
    if args.plot:
        check_importable("--plot", "matplotlib", "demo")
        check_output_file("--plot", args.plot)
    if args.json:
        check_output_file("--json", args.json)


def main(args: Any) -> int:
    """``gpuadam bench``: run, print the table, write the JSON and the plot. 1 if ours failed a check."""
    try:
        config = config_from_args(args)
        check_before_running(config, args)
    except ValueError as exc:
        print(f"gpuadam bench: {exc}", file=sys.stderr)
        return 2
    doc = run(config)
    print(format_table(doc))
    if args.json:
        write_json(doc, args.json)
    if args.plot:
        plot(doc, args.plot)
    bad = [r for r in doc["results"] if r["group"] != "peer" and r["status"] in ("failed", "error")]
    return 1 if bad else 0
