"""Step bookkeeping that stays on the GPU: gradient norm, clip factor, skip flag, step counts, lr.

When a GPU step must clip by the global norm, skip non-finite steps or run without ever
synchronising with the host (``capturable``), the host cannot compute the per-step constants: they
depend on a reduction over the gradients, or on a step count that a skipped step must not advance.
A one-thread kernel per group then computes them on the device, with the very function the host
uses (``kernels.rules``), into a small constants array that the update kernel reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpuadam.kernels.rules import N_CONSTANTS


class DeviceSteps:
    """The device arrays of one optimizer's device-side bookkeeping (Numba CUDA arrays; the cupy
    backend uses them too, through ``__cuda_array_interface__``).

    Step counts and constants are kept per *slot*: the params of one group that share a step count
    (all of them, unless a loaded state gave them different counts). Every step advances or skips
    all params together, so the slots set at construction or load hold until the next load.
    """

    def __init__(self, n_groups: int, lrs: list[float] | None, stream: Callable[[], Any] | None = None) -> None:
        from numba import cuda

        from gpuadam.kernels import numba_cuda

        self._kernels = numba_cuda
        self._cuda = cuda
        # Where the bookkeeping kernels run: the stream of the update kernels (CuPy's current stream
        # on the cupy backend), so a step captured in a CUDA graph on that stream holds them all.
        self.stream = stream or (lambda: 0)
        self.sums = cuda.to_device(np.zeros(2, np.float64))  # sum of squares, count of inf/NaN
        # lr >= 0 replaces the host's lr (capturable); -1 means: use the host's value
        self.lr = cuda.to_device(np.array(lrs if lrs is not None else [-1.0] * n_groups, np.float64))
        self._lr_host = list(lrs) if lrs is not None else None
        self.norm = cuda.to_device(np.zeros(1, np.float64))
        self.skipped = cuda.to_device(np.zeros(1, np.int64))
        self.set_slots([0] * n_groups)

    def set_slots(self, steps: list[int]) -> None:
        """One step count per slot, on the device, and a constants row per slot (allocated here,
        at construction or load, never in a step)."""
        cuda = self._cuda
        self.steps = cuda.to_device(np.array(steps, np.int64))
        c32 = cuda.to_device(np.zeros((len(steps), N_CONSTANTS), np.float32))
        c64 = cuda.to_device(np.zeros((len(steps), N_CONSTANTS), np.float64))
        self._consts = [(c32[s], c64[s]) for s in range(len(steps))]

    def upload(self, host: np.ndarray) -> Any:
        """A device copy of a small host array (a FlatBuffer's valid counts), made outside ``step()``."""
        return self._cuda.to_device(host)

    def sumsq(self, g: Any, fmt: int | None, inv_scale: float, valid: Any = None) -> None:
        if hasattr(g, "__cuda_array_interface__") and not isinstance(g, self._cuda.devicearray.DeviceNDArray):
            g = self._cuda.as_cuda_array(g, sync=False)  # a CuPy array: no stream sync on the host
        self._kernels.grad_sumsq(g, self.sums, fmt, inv_scale, valid, stream=self.stream())

    def sync_lr(self, group: int, lr: float) -> None:
        """Upload a changed lr (capturable). A copy from host memory, which a graph being captured
        cannot hold: a captured step keeps ``lr`` unchanged, and a schedule writes ``self.lr``."""
        if self._lr_host is not None and self._lr_host[group] != lr:
            self.lr[group : group + 1].copy_to_device(np.array([lr], np.float64), stream=self.stream())
            self._lr_host[group] = lr

    def prepare(self, slot: int, group: int, hyper: Any, inv_scale: float, max_norm: float,
                skip_nonfinite: bool, host_step: int, last: bool) -> None:
        c32, c64 = self._consts[slot]
        self._kernels.prepare(
            type(hyper).constants_fn, self.sums, hyper.scalars(), np.float64(inv_scale), np.float64(max_norm),
            np.float64(skip_nonfinite), self.lr, np.int64(group), self.steps, np.int64(slot), c32, c64,
            self.norm, self.skipped, np.int64(last), np.int64(host_step), stream=self.stream(),
        )

    def constants(self, slot: int, dtype: np.dtype) -> Any:
        return self._consts[slot][0 if dtype == np.float32 else 1]

    def read_steps(self) -> list[int]:
        """The step count of every slot (a copy to the host: it synchronises)."""
        return [int(x) for x in self.steps.copy_to_host()]
