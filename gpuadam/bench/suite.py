"""What to run (``Config``), in batches alive one at a time, with a progress bar: ``run``."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.bench.cases import Implementation, device_of
from gpuadam.bench.ceiling import Ceiling
from gpuadam.bench.ours import (
    OursFlatBuffer,
    OursFunctional,
    OursLaunch,
    OursOptimizer,
    our_implementations,
)
from gpuadam.bench.peers import TorchPeer, peer_implementations
from gpuadam.bench.problems import (
    DEFAULT_SIZES,
    DTYPES,
    LOW_PRECISION,
    MANY_COUNT,
    MANY_RANGE,
    OPTIMIZERS,
    QUICK_SIZES,
    TINY,
    Problem,
    make_problem,
    many_sizes,
    numpy_dtype,
)
from gpuadam.bench.report import report
from gpuadam.bench.timing import Entry, run_entries


@dataclass
class Config:
    """What to benchmark and how hard; ``Config.quick()`` for a smoke run."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    sweep: bool = True
    many: bool = False
    overhead: bool = True
    backends: tuple[str, ...] | None = None  # None: every available one
    optimizers: tuple[str, ...] = ("adam",)
    dtype: str = "float32"
    master_weights: bool = False  # half params with float32 master weights and state
    peers: bool = True
    repeat: int = 5  # timed samples per implementation and round
    rounds: int = 3  # fresh allocations, each in a rotated order (see timing.run_entries)
    min_time: float = 0.02  # seconds per sample
    max_steps: int = 10_000  # steps per sample at most
    max_sets: int = 64  # GPU buffer sets at most
    many_count: int = MANY_COUNT
    many_range: tuple[int, int] = MANY_RANGE
    seed: int = 0
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_defaults(cls, **kw: Any) -> Config:
        base = dict(sizes=QUICK_SIZES, repeat=3, rounds=1, min_time=0.002, max_sets=4, many_count=40,
                    many_range=(100, 1000), quick=True)
        return cls(**{**base, **kw})

    def check(self) -> None:
        """A one-line ValueError naming the flag, what was given and what is accepted."""
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: got {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.master_weights and self.dtype not in LOW_PRECISION:
            raise ValueError(f"--master-weights: got --dtype {self.dtype}; float32 master weights are for "
                             f"{'/'.join(LOW_PRECISION)} params")
        if self.dtype == "bfloat16":
            try:
                numpy_dtype(self.dtype)
            except ImportError:
                raise ValueError("--dtype bfloat16 needs ml_dtypes on the host: pip install 'gpuadam[half]'") from None
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(f"--optimizers: got {','.join(unknown) or 'nothing'}; expected some of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.backends is not None:
            bad = [b for b in self.backends if b not in backends.NAMES]
            if bad or not self.backends:
                raise ValueError(f"--backends: got {','.join(bad) or 'nothing'}; expected some of "
                                 f"{', '.join(backends.NAMES)}")
        if self.repeat < 1:
            raise ValueError(f"--repeat: got {self.repeat}; expected an integer >= 1")
        if self.rounds < 1:
            raise ValueError(f"--rounds: got {self.rounds}; expected an integer >= 1")
        if not self.min_time > 0:
            raise ValueError(f"--min-time: got {self.min_time}; expected seconds > 0")
        if self.max_sets < 1:
            raise ValueError(f"--max-buffer-sets: got {self.max_sets}; expected an integer >= 1")


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (a log or a pipe gets no ``\\r``
    updates): tqdm when installed, else one rewritten line. Its label names what runs now."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        enabled = enabled and callable(isatty) and bool(isatty())
        self.total, self.done, self.enabled, self.bar, self._text = total, 0, enabled, None, ""
        if enabled:
            try:
                from tqdm import tqdm

                fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
                self.bar = tqdm(total=total, desc="gpuadam bench", file=self.stream, leave=False, bar_format=fmt)
            except ImportError:
                pass

    def note(self, text: str) -> None:
        """Show ``text`` as what runs now (before it runs: a label after the fact misleads)."""
        self._text = text
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=True)
        else:
            self._line()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done // max(1, self.total)
        print(f"\rgpuadam bench: {pct:3d}% ({self.done}/{self.total}) {self._text[:60]:60s}",
              end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=self.stream)


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
    others = peers + list(extra)
    batches: list[Batch] = []
    for opt_name in config.optimizers:
        spec = OPTIMIZERS[opt_name]
        if config.sweep:
            for n in config.sizes:
                make = functools.partial(make_problem, spec, dtype, (n,), config.seed, master)
                impls = [i for b in use for i in our_implementations(b)] + others
                batches.append(Batch("sizes", {"one": make}, [(i, "one", "one tensor") for i in impls]))
        if config.many:
            sizes = many_sizes(config.many_count, *config.many_range, config.seed)
            problems = {"one": functools.partial(make_problem, spec, dtype, (sum(sizes),), config.seed, master),
                        "many": functools.partial(make_problem, spec, dtype, sizes, config.seed, master)}
            items = []
            for b in use:
                items += [(Ceiling(b), "one", "one tensor"), (OursOptimizer(b), "one", "one tensor"),
                          (OursOptimizer(b), "many", "separate arrays"), (OursFlatBuffer(b), "many", "flat buffer")]
            items += [(impl, "many", "separate arrays") for impl in others]
            batches.append(Batch("many", problems, items))
    if config.overhead:
        spec = OPTIMIZERS[config.optimizers[0]]
        make = functools.partial(make_problem, spec, dtype, (TINY,), config.seed, master)
        impls: list[Implementation] = []
        for b in use:
            impls += [OursOptimizer(b), OursFunctional(b), OursLaunch(b)]
        impls += [p for p in peers if isinstance(p, TorchPeer)]
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
