"""What to run (a ``Config``), in batches alive one at a time, with a progress bar: ``run``."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpuadam import backends
from gpuadam.bench.cases import Implementation, device_of
from gpuadam.bench.ceiling import Ceiling
from gpuadam.bench.config import Config
from gpuadam.bench.lean_state import lean_implementations
from gpuadam.bench.ours import (
    OursFlatBuffer,
    OursFunctional,
    OursLaunch,
    OursOptimizer,
    our_implementations,
)
from gpuadam.bench.ours_torch import OursTorch
from gpuadam.bench.peers import TorchPeer, peer_implementations
from gpuadam.bench.problems import CPU, OPTIMIZERS, TINY, Problem, make_problem, many_sizes, numpy_dtype
from gpuadam.bench.progress import Progress
from gpuadam.bench.report import report
from gpuadam.bench.timing import Entry, run_entries

__all__ = ["Batch", "Config", "Progress", "build_batches", "run", "selected_backends"]


def selected_backends(config: Config) -> tuple[list[str], dict[str, str]]:
    """The backends to benchmark, and the reason each requested-but-unavailable one is left out."""
    statuses = backends.available_backends()
    wanted = config.backends or tuple(n for n in backends.NAMES if statuses[n].available)
    use = [n for n in wanted if statuses[n].available]
    skipped = {n: statuses[n].reason for n in wanted if not statuses[n].available}
    return use, skipped


@dataclass
class Batch:
    """Entries alive (and interleaved) together; the problems' data is made only when it runs."""

    suite: str
    problems: dict[str, Callable[[], Problem]]  # key -> factory
    items: list[tuple[Implementation, str, str]]  # (implementation, problem key, layout)

    def entries(self) -> list[Entry]:
        made = {key: make() for key, make in self.problems.items()}
        return [Entry(self.suite, impl, made[key], layout, host_timer=self.suite == "overhead")
                for impl, key, layout in self.items]


def build_batches(config: Config, use: list[str], extra: Sequence[Implementation] = ()) -> list[Batch]:
    """What to run, in batches: each size of each optimizer, the many-tensor case, the overhead."""
    dtype = numpy_dtype(config.dtype)
    master = config.master_weights
    devices = {device_of(b) for b in use}
    peers = peer_implementations(devices) if config.peers else []
    # in the many-tensor and overhead tables, on the devices benchmarked
    ours_torch = [OursTorch("cpu" if d == CPU else "cuda") for d in sorted(devices)]
    others = peers + list(extra)
    batches: list[Batch] = []
    for opt_name in config.optimizers:
        spec = OPTIMIZERS[opt_name]
        if config.sweep:
            for n in config.sizes:
                make = functools.partial(make_problem, spec, dtype, (n,), config.seed, master)
                impls = [i for b in use for i in our_implementations(b)] if "float32" in config.state_dtypes else []
                if spec.rule == "adam":  # lean state is for Adam/AdamW (Config.check: float32 params)
                    impls += lean_implementations(config.state_dtypes, use, devices, config.peers)
                impls += others
                batches.append(Batch("sizes", {"one": make}, [(i, "one", "one tensor") for i in impls]))
        if config.many:
            sizes = many_sizes(config.many_count, *config.many_range, config.seed)
            problems = {"one": functools.partial(make_problem, spec, dtype, (sum(sizes),), config.seed, master),
                        "many": functools.partial(make_problem, spec, dtype, sizes, config.seed, master)}
            items = []
            for b in use:
                items += [(Ceiling(b), "one", "one tensor"), (OursOptimizer(b), "one", "one tensor"),
                          (OursOptimizer(b), "many", "separate arrays"), (OursFlatBuffer(b), "many", "flat buffer")]
            items += [(impl, "many", "separate arrays") for impl in ours_torch + others]
            batches.append(Batch("many", problems, items))
    if config.overhead:
        spec = OPTIMIZERS[config.optimizers[0]]
        make = functools.partial(make_problem, spec, dtype, (TINY,), config.seed, master)
        impls: list[Implementation] = []
        for b in use:
            impls += [OursOptimizer(b), OursFunctional(b), OursLaunch(b)]
        impls += ours_torch + [p for p in peers if isinstance(p, TorchPeer)]
        batches.append(Batch("overhead", {"one": make}, [(i, "one", "one tensor") for i in impls]))
    return batches


def run(config: Config, extra: Sequence[Implementation] = ()) -> dict:
    """Run the benchmark described by ``config`` and return the JSON-ready report.

    ``extra``: more implementations to run beside ours and the peers (verified and timed the same way).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # too late if an OpenMP runtime already started
    config.check()
    started = time.time()
    before = _cpu_snapshot()
    use, skipped = selected_backends(config)
    if not use:
        raise RuntimeError("no backend to benchmark: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    batches = build_batches(config, use, extra)
    progress = Progress(sum(len(b.items) for b in batches) * (1 + config.repeat) * config.rounds, config.progress)
    done: list[Entry] = []
    try:
        for batch in batches:  # one batch alive at a time: the 64M-element buffers add up
            entries = batch.entries()
            run_entries(entries, config, progress)
            for e in entries:  # keep the figures, drop the data
                e.problem = _shell(e.problem)
            done += entries
    finally:
        progress.close()
    doc = report(config, done, skipped, time.time() - started)
    doc["machine"]["other_processes_cpus"] = _others_cpus(before, _cpu_snapshot())
    return doc


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process, wall seconds), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    t = os.times()  # with the children waited for (DeepSpeed runs ninja to load its op)
    own = t.user + t.system + t.children_user + t.children_system
    return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()


def _others_cpus(a: tuple | None, b: tuple | None) -> float | None:
    """How many CPUs other processes kept busy, on average, between two snapshots."""
    if a is None or b is None or b[2] <= a[2]:
        return None
    return round(max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]), 3)


def _shell(problem: Problem) -> Problem:
    """The problem without its arrays (the report needs its shape, not its data)."""
    empty = np.empty(0, problem.dtype)
    return Problem(problem.spec, problem.dtype, problem.sizes, empty, empty, empty, np.empty(0, np.int64),
                   problem.master)
