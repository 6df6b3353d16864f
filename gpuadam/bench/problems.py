"""What a benchmark point is: the optimizers as benchmarked, the bytes a step must move, the
random problems, the sizes, and the constants of the verification and the suites."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuadam import lean
from gpuadam.hyper import AdamHyper

SCHEMA = "gpuadam-bench/1"
CPU, GPU = "cpu", "gpu"
DEFAULT_SIZES = (2**16, 2**20, 2**24)
QUICK_SIZES = (2**12, 2**16)
#: Stored in 16 bits, computed in float32: with half state, or (``--master-weights``) float32 master
#: weights and state beside the half params.
LOW_PRECISION = ("float16", "bfloat16")
DTYPES = ("float32", "float64", *LOW_PRECISION)
#: ``--state-dtype``: the optimizer state's layouts. ``float32`` is the params' own state (the usual
#: rows); the lean ones (``gpuadam.lean``) take float32 params and Adam/AdamW without amsgrad.
STATE_DTYPES = ("float32", "bfloat16", "int8")
LEAN_STATE = ("bfloat16", "int8")

L2_DEFAULT_BYTES = 50 * 2**20  # H100's L2, when the device does not say
VERIFY_STEPS = 2  # step 1 from zero state hides beta2 and the bias corrections: p1 = p0 - lr*sign(g)
VERIFY_SAMPLE = 1 << 16  # elements compared with the float64 reference (the rule is elementwise)
VERIFY_ULPS = 4  # allowed error, in eps of the compute dtype, per step, of max|x| + max|change of x|
#: Half storage: and, per element, this many units in the last place of the stored format (ours round
#: once per step, to nearest even).
VERIFY_STORAGE_ULPS = 1
TINY = 64  # elements of the tensor that measures per-step host overhead
MANY_COUNT = 400
MANY_RANGE = (1_000, 100_000)
#: Elements per block of the NumPy peer: its two scratch blocks and the array blocks stay in cache,
#: so the dozen ufunc passes per element hit cache instead of memory (figures: BENCHMARKS.md).
NUMPY_BLOCK = 1 << 18

STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax", "master": "w"}


def is_half(dtype: Any) -> bool:
    """float16 or bfloat16 (``ml_dtypes``): stored in 16 bits, computed in float32."""
    return np.dtype(dtype).name in LOW_PRECISION


#: (mantissa bits, exponent of the smallest normal) of the half formats
HALF_FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}


def ulp(x: np.ndarray, dtype: Any) -> np.ndarray:
    """The unit in the last place of half-precision ``dtype`` (or its name) at each value of ``x`` (float64)."""
    bits, emin = HALF_FORMATS[dtype if isinstance(dtype, str) else np.dtype(dtype).name]
    _, e = np.frexp(np.abs(x))  # |x| = f * 2**e, 0.5 <= f < 1
    exponent = np.where(x == 0, emin, np.maximum(e - 1, emin))
    return np.ldexp(1.0, exponent - bits)


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a ``--dtype`` name (bfloat16 is ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as benchmarked: its kernel rule, hyperparameters, and the arrays it moves.

    Array names: ``p`` the params, ``g`` the gradients, ``m``, ``v``, ``vmax`` the state, and with
    master weights ``w``, the float32 master the step updates (``p`` is then only written).
    """

    name: str
    rule: str
    hyper: AdamHyper
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def state(self) -> tuple[str, ...]:
        """The state arrays (everything written except p), as ``m``, ``v``, ``vmax``."""
        return tuple(x for x in self.writes if x != "p")

    def io(self, master: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(reads, writes)``: with master weights the step reads and writes ``w`` and only writes ``p``."""
        if not master:
            return self.reads, self.writes
        swap = tuple("w" if x == "p" else x for x in self.reads)
        return swap, (*(x for x in self.writes if x != "p"), "w", "p")

    def itemsize(self, name: str, dtype: Any, master: bool = False) -> int:
        """Bytes per element of array ``name``: params and gradients in ``dtype``, master and state in
        float32 with master weights, else in ``dtype`` too."""
        dtype = np.dtype(dtype)
        return dtype.itemsize if name in ("p", "g") or not master else 4

    def bytes_per_element(self, dtype: Any, master: bool = False) -> int:
        """Bytes one step must move per element: each array read once, each changed one written once."""
        reads, writes = self.io(master)
        return sum(self.itemsize(x, dtype, master) for x in reads + writes)

    def read_bytes(self, dtype: Any, master: bool = False) -> int:
        return sum(self.itemsize(x, dtype, master) for x in self.io(master)[0])

    def accounting(self, dtype: Any, master: bool = False) -> dict:
        reads, writes = self.io(master)

        def listed(names: tuple[str, ...]) -> str:
            return ", ".join(f"{x} {self.itemsize(x, dtype, master)}" for x in names)

        read_b = sum(self.itemsize(x, dtype, master) for x in reads)
        total = self.bytes_per_element(dtype, master)
        return {
            "bytes_per_element": total,
            "reads": list(reads),
            "writes": list(writes),
            "definition": (
                f"reads {listed(reads)} ({read_b} B) and writes {listed(writes)} ({total - read_b} B) once "
                f"per element = {total} B/element; the ceiling moves the same arrays"
            ),
        }


_ADAM_IO = (("p", "g", "m", "v"), ("p", "m", "v"))
_AMSGRAD_IO = (("p", "g", "m", "v", "vmax"), ("p", "m", "v", "vmax"))

OPTIMIZERS = {
    "adam": OptimizerSpec("adam", "adam", AdamHyper(), *_ADAM_IO),
    "adamw": OptimizerSpec("adamw", "adam", AdamHyper(weight_decay=1e-2, decoupled_weight_decay=True), *_ADAM_IO),
    "amsgrad": OptimizerSpec("amsgrad", "amsgrad", AdamHyper(amsgrad=True), *_AMSGRAD_IO),
}


@dataclass
class Problem:
    """Host data of one benchmark point: the tensors' sizes, random p0 and two gradients (in the
    params' dtype), and whether the step keeps float32 master weights."""

    spec: OptimizerSpec
    dtype: np.dtype
    sizes: tuple[int, ...]
    p0: np.ndarray  # all tensors concatenated
    g1: np.ndarray
    g2: np.ndarray
    sample: np.ndarray  # indices the verification compares
    master: bool = False

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    @property
    def bytes_per_step(self) -> int:
        return self.spec.bytes_per_element(self.dtype, self.master) * self.n

    @property
    def half(self) -> bool:
        return is_half(self.dtype)

    @property
    def compute_dtype(self) -> np.dtype:
        """The precision of the math: float32 for half storage."""
        return np.dtype(np.float32) if self.half else self.dtype

    def storage(self, name: str) -> np.dtype:
        """The dtype array ``name`` is stored in (``spec.itemsize``'s rule)."""
        return self.dtype if name in ("p", "g") or not self.master else np.dtype(np.float32)

    @property
    def label(self) -> str:
        return size_label(self.n) if len(self.sizes) == 1 else f"{len(self.sizes)} tensors, {self.n} el."

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """Per-tensor views of a concatenated host array."""
        bounds = np.cumsum((0,) + self.sizes)
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def make_problem(spec: OptimizerSpec, dtype: Any, sizes: Sequence[int], seed: int, master: bool = False) -> Problem:
    """Random parameters and gradients (never zeros: they would flatter a kernel on some hardware)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(sum(sizes))
    draw = np.float32 if is_half(dtype) else dtype  # half values: float32 draws, rounded to nearest
    p0, g1, g2 = (rng.standard_normal(n, dtype=draw).astype(dtype) for _ in range(3))
    if n <= VERIFY_SAMPLE:
        sample = np.arange(n)
    else:  # both ends (tails and remainders live there), and a random spread in between, in whole
        # quantisation blocks: int8 state's reference needs each block's every element (its absmax)
        blocks = lean.n_blocks(n)
        ends = np.r_[0:4, blocks - 4 : blocks]
        chosen = np.unique(np.r_[ends, rng.integers(0, blocks, VERIFY_SAMPLE // lean.BLOCK - ends.size)])
        sample = (chosen[:, None] * lean.BLOCK + np.arange(lean.BLOCK)).reshape(-1)
        sample = sample[sample < n]
    return Problem(spec, dtype, tuple(int(s) for s in sizes), p0, g1, g2, sample, master)


def lean_bytes_per_step(kind: str, sizes: Sequence[int]) -> int:
    """Bytes one Adam step with ``kind`` state must move over tensors of ``sizes``: float32 p read
    and written and g read (12 B/element), each moment read and written as bfloat16 bits (2 B each
    way) or, for int8, as a uint8 code (1 B each way) plus one float32 absmax per block of
    ``lean.BLOCK`` elements of each tensor (4 B each way)."""
    n = int(sum(sizes))
    if kind == "bfloat16":
        return n * (12 + 2 * 2 * 2)
    if kind == "int8":
        return n * (12 + 2 * 2 * 1) + sum(lean.n_blocks(s) for s in sizes) * 2 * 2 * 4
    raise ValueError(f"no lean state layout {kind!r}; expected one of {', '.join(LEAN_STATE)}")


def lean_accounting(kind: str) -> dict:
    """The JSON's account of a lean layout's bytes (``lean_bytes_per_step``), per element at one
    large tensor (the absmax's share: 16 B per block of ``lean.BLOCK``)."""
    if kind == "bfloat16":
        moments = "m and v as bfloat16 bits, 2 B read and 2 B written each"
    else:
        moments = (f"m and v as uint8 codes, 1 B read and 1 B written each, plus one float32 absmax per "
                   f"{lean.BLOCK} elements per moment, read and written ({16 / lean.BLOCK:g} B/element)")
    per_element = lean_bytes_per_step(kind, (lean.BLOCK,)) / lean.BLOCK
    return {
        "bytes_per_element": per_element,
        "definition": f"float32 p read and written and g read (12 B), {moments} = {per_element:g} B/element "
                      f"(blocks of {lean.BLOCK} follow each tensor); the layout's ceiling moves the same arrays",
    }


def many_sizes(count: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    """``count`` tensor sizes log-uniform in [low, high]: a model's many small tensors."""
    rng = np.random.default_rng(seed)
    return tuple(int(x) for x in np.exp(rng.uniform(math.log(low), math.log(high), count)).round())


def size_label(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"2^16,2**20,1000,1e6"`` -> sizes; a ValueError names the bad item."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "^" in item or "**" in item:
                base, exp = item.replace("**", "^").split("^")
                value = int(base) ** int(exp)
            else:
                value = float(item) if "e" in item.lower() else int(item)
                if value != int(value):
                    raise ValueError
                value = int(value)
        except ValueError:
            raise ValueError(f"--sizes: cannot read {item!r} (use e.g. 2^20, 1048576 or 1e6)") from None
        if value < 1:
            raise ValueError(f"--sizes: sizes must be >= 1, got {item!r}")
        sizes.append(value)
    return tuple(sizes)


def adam_kwargs(h: AdamHyper) -> dict:
    return dict(
        lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad,
        maximize=h.maximize, eps_root=h.eps_root, bias_correction=h.bias_correction,
        decoupled_weight_decay=h.decoupled_weight_decay,
    )
