"""What the tests of tests/gpu share: where they run (a GPU or the simulator), the sizes each place
affords, and arrays of each kind (Numba device arrays, CuPy arrays, torch CUDA tensors) to and from
the host."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

#: Tensors of odd sizes; on a GPU the first loops several times over Numba's grid (one wave of
#: 8 blocks of 256 threads per SM), in the simulator over its grid of 2 blocks of 32 threads.
SHAPES = [(150,), (3, 5), (1,)] if SIM else [(1_000_003,), (257, 3), (1,)]
STEPS = 2 if SIM else 3


@functools.cache
def gpu_here() -> bool:
    """True on a machine whose numba-cuda can run on a real GPU (never in the simulator)."""
    if SIM:
        return False
    from gpuadam import backends

    return backends.status("numba-cuda").available


def backends_here() -> list[str]:
    """The GPU backends the tests run on: both on a GPU, numba-cuda alone in the simulator."""
    return ["numba-cuda"] if SIM else ["numba-cuda", "cupy"]


def put(x: np.ndarray, kind: str = "numba") -> Any:
    """A device copy of host array ``x``: a Numba device array, a CuPy array or a torch tensor."""
    if kind == "numba":
        from numba import cuda

        return cuda.to_device(np.ascontiguousarray(x))
    if kind == "cupy":
        import cupy

        return cupy.asarray(x)
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to("cuda")
    raise ValueError(f"unknown array kind {kind!r}")


def native(backend: str) -> str:
    """The array kind each backend's users hold: Numba's for numba-cuda, CuPy's for cupy."""
    return "numba" if backend == "numba-cuda" else "cupy"


def put_all(arrays: list[np.ndarray], kind: str) -> list:
    return [put(x, kind) for x in arrays]


def host(x: Any) -> np.ndarray:
    """The host copy of a device array of any kind (after the work queued on it is done)."""
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def free_device_memory() -> None:
    """Give pooled memory back between big tests: CuPy's pool and torch's cache hold on to it."""
    import gc

    gc.collect()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:  # no CuPy (the simulator): nothing pooled
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # no torch CUDA: nothing cached
        pass
