"""``gpuadam bench``: arguments to ``Config``, then run, print, write."""

from __future__ import annotations

import sys
from typing import Any

from gpuadam.bench.problems import parse_sizes
from gpuadam.bench.report import format_table, plot, write_json
from gpuadam.bench.suite import Config, run


def config_from_args(args: Any) -> Config:
    """A ``Config`` from the ``gpuadam bench`` arguments (``--quick`` changes the defaults only)."""
    split = (lambda s: tuple(x.strip() for x in s.split(",") if x.strip()))  # noqa: E731
    kw: dict[str, Any] = dict(
        optimizers=split(args.optimizers), dtype=args.dtype, master_weights=args.master_weights,
        many=args.many, peers=args.peers,
        overhead=not args.no_overhead, progress=not args.no_progress,
        sweep=args.sizes is not None or not args.many,
    )
    if args.sizes is not None:
        kw["sizes"] = parse_sizes(args.sizes)
    if args.backends:
        kw["backends"] = split(args.backends)
    for name, attr in (("repeat", "repeat"), ("min_time", "min_time"), ("max_buffer_sets", "max_sets")):
        if getattr(args, name) is not None:
            kw[attr] = getattr(args, name)
    config = Config.quick_defaults(**kw) if args.quick else Config(**kw)
    config.check()
    return config


def main(args: Any) -> int:
    """``gpuadam bench``: run, print the table, write the JSON and the plot. 1 if ours failed a check."""
    try:
        config = config_from_args(args)
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
