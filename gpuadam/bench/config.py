"""What to benchmark and how hard: ``Config``, the flags of ``gpuadam bench`` checked in one place.

Below ``timing``, ``report`` and ``suite``, which all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuadam import backends
from gpuadam.bench.problems import (
    DEFAULT_SIZES,
    DTYPES,
    LEAN_STATE,
    LOW_PRECISION,
    MANY_COUNT,
    MANY_RANGE,
    OPTIMIZERS,
    QUICK_SIZES,
    STATE_DTYPES,
    numpy_dtype,
)


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
    #: the state layouts of the size sweep: "float32" the params' own state (the usual rows), the
    #: lean ones each with our Adam(state_dtype=...).step and the layout's ceiling
    state_dtypes: tuple[str, ...] = ("float32",)
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
        bad = [s for s in self.state_dtypes if s not in STATE_DTYPES]
        if bad or not self.state_dtypes:
            raise ValueError(f"--state-dtype: got {','.join(bad) or 'nothing'}; expected some of "
                             f"{', '.join(STATE_DTYPES)}")
        lean = [s for s in self.state_dtypes if s in LEAN_STATE]
        if lean and (self.dtype != "float32" or self.master_weights):
            raise ValueError(f"--state-dtype {','.join(lean)}: lean state is benchmarked with float32 params; "
                             f"got --dtype {self.dtype}{' --master-weights' if self.master_weights else ''}")
        if lean and not any(OPTIMIZERS[o].rule == "adam" for o in self.optimizers):
            raise ValueError(f"--state-dtype {','.join(lean)}: lean state is for adam/adamw (no amsgrad); got "
                             f"--optimizers {','.join(self.optimizers)}")
        if lean and not self.sweep:
            raise ValueError(f"--state-dtype {','.join(lean)}: lean state runs in the size sweep; give --sizes "
                             "with --many")
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
