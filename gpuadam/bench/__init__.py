"""Micro-benchmark engine behind ``gpuadam bench``: the ceiling, our kernels, the peers.

Reading order:

- ``problems``  - the optimizers as benchmarked, the bytes a step must move (its accounting), the
                  random problems and the constants
- ``cases``     - the interface of an implementation and of its buffers (a ``Case``)
- ``ceiling``   - kernels that move exactly the bytes of one step with no math, on every backend
                  (``ceiling_cuda`` for Numba CUDA): the bandwidth a step can reach, in the same run
- ``ours``      - the public ``Adam.step``, ``FlatBuffer``, ``adam_step`` and the raw kernel launch,
                  so host overhead shows separately
- ``peers``     - NumPy, PyTorch, optax, DeepSpeed, each only if importable
- ``lean_state``- ``--state-dtype``: our ``Adam(state_dtype=...).step``, bitsandbytes' ``Adam8bit``, and
                  their verification against the reference stepped from the dequantised state
- ``config``    - ``Config``, what to run and how hard; ``progress``: the progress bar
- ``timing``    - CPU: ``perf_counter``, implementations interleaved round-robin; GPU: CUDA events
                  around the launches, buffer sets rotated past the L2 cache; and verification:
                  every implementation checked against ``gpuadam.reference`` before it is timed
- ``report``    - table, JSON, PNG, from the timed entries
- ``suite``     - ``run``: the batches, timed, then reported; ``command``: the CLI

Each module imports only those listed above it (``tests/test_layers.py`` fails on a circle).

Byte accounting: a step must read every array it uses once and write every array it changes once;
for Adam that is p, g, m, v read and p, m, v written, ``7 * itemsize`` = 28 B/element in float32
(AMSGrad adds vmax: 9 arrays, 36 B). Half params keep half state (14 B/element for Adam) or, with
master weights, float32 master, m and v beside the half g and p (28 B). Bandwidth is those bytes
divided by the time. The ceiling kernel reads and writes the same arrays, so it is counted the
same way (write-allocate traffic, the read of a line before it is written, is neither counted for
it nor for us). Lean state (``--state-dtype``) moves float32 p and g beside its moments: bfloat16
bits (20 B/element), or uint8 codes plus one float32 absmax per 256 elements per moment (16.0625
B/element); each layout has a ceiling moving exactly those arrays.
"""

from gpuadam.bench.cases import Case, Implementation
from gpuadam.bench.ceiling import CUPY_CEILING, Ceiling, LeanCeiling, ceiling_kernel
from gpuadam.bench.command import config_from_args, main
from gpuadam.bench.config import Config
from gpuadam.bench.lean_state import BitsandbytesPeer, OursLean
from gpuadam.bench.ours import OursFlatBuffer, OursFunctional, OursLaunch, OursOptimizer
from gpuadam.bench.ours_torch import OursTorch
from gpuadam.bench.peers import DeepSpeedPeer, NumpyPeer, OptaxPeer, TorchPeer, numpy_adam
from gpuadam.bench.problems import (
    DTYPES,
    LEAN_STATE,
    OPTIMIZERS,
    SCHEMA,
    STATE_DTYPES,
    VERIFY_STEPS,
    OptimizerSpec,
    Problem,
    lean_accounting,
    lean_bytes_per_step,
    make_problem,
    numpy_dtype,
    parse_sizes,
    ulp,
)
from gpuadam.bench.report import format_table, plot, report, write_json
from gpuadam.bench.suite import run
from gpuadam.bench.timing import verify

__all__ = [
    "CUPY_CEILING", "DTYPES", "LEAN_STATE", "OPTIMIZERS", "SCHEMA", "STATE_DTYPES", "VERIFY_STEPS",
    "BitsandbytesPeer", "Case", "Ceiling", "Config", "DeepSpeedPeer", "Implementation", "LeanCeiling", "NumpyPeer",
    "OptaxPeer", "OptimizerSpec", "OursFlatBuffer", "OursFunctional", "OursLaunch", "OursLean", "OursOptimizer",
    "OursTorch", "Problem", "TorchPeer", "ceiling_kernel", "config_from_args", "format_table", "lean_accounting",
    "lean_bytes_per_step", "main", "make_problem", "numpy_adam", "numpy_dtype", "parse_sizes", "plot", "report",
    "run", "ulp", "verify", "write_json",
]
