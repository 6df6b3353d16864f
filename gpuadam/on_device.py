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
    backend uses them too, through ``__cuda_array_interface__``)."""

    def __init__(self, n_groups: int, lrs: list[float] | None, stream: Callable[[], Any] | None = None) -> None:
        from numba import cuda

        from gpuadam.kernels import numba_cuda

        self._kernels = numba_cuda
        self._cuda = cuda
        # Where the bookkeeping kernels run: the stream of the update kernels (CuPy's current stream
        # on the cupy backend), so a step captured in a CUDA graph on that stream holds them all.
        self.stream = stream or (lambda: 0)
        self.red = cuda.to_device(np.zeros(2, np.float64))  # sum of squares, count of inf/NaN
        self.steps = cuda.to_device(np.zeros(n_groups, np.int64))
        # lr >= 0 replaces the host's lr (capturable); -1 means: use the host's value
        self.lr = cuda.to_device(np.array(lrs if lrs is not None else [-1.0] * n_groups, np.float64))
        self._lr_host = list(lrs) if lrs is not None else None
        self.norm = cuda.to_device(np.zeros(1, np.float64))
        self.skipped = cuda.to_device(np.zeros(1, np.int64))
        c32 = cuda.to_device(np.zeros((n_groups, N_CONSTANTS), np.float32))
        c64 = cuda.to_device(np.zeros((n_groups, N_CONSTANTS), np.float64))
        self._consts = [(c32[g], c64[g]) for g in range(n_groups)]

    def sumsq(self, g: Any, fmt: int | None = None) -> None:
        if hasattr(g, "__cuda_array_interface__") and not isinstance(g, self._cuda.devicearray.DeviceNDArray):
            g = self._cuda.as_cuda_array(g, sync=False)  # a CuPy array: no stream sync on the host
        self._kernels.grad_sumsq(g, self.red, fmt, stream=self.stream())

    def sync_lr(self, group: int, lr: float) -> None:
        """Upload a changed lr (capturable). A copy from host memory, which a graph being captured
        cannot hold: a captured step keeps ``lr`` unchanged, and a schedule writes ``self.lr``."""
        if self._lr_host is not None and self._lr_host[group] != lr:
            self.lr[group : group + 1].copy_to_device(np.array([lr], np.float64), stream=self.stream())
            self._lr_host[group] = lr

    def prepare(self, group: int, hyper: Any, inv_scale: float, max_norm: float, skip_nonfinite: bool,
                host_step: int, last: bool) -> None:
        c32, c64 = self._consts[group]
        self._kernels.prepare(
            type(hyper).constants_fn, self.red, hyper.scalars(), np.float64(inv_scale), np.float64(max_norm),
            np.float64(skip_nonfinite), self.lr, self.steps, np.int64(group), c32, c64, self.norm,
            self.skipped, np.int64(last), np.int64(host_step), stream=self.stream(),
        )

    def constants(self, group: int, dtype: np.dtype) -> Any:
        return self._consts[group][0 if dtype == np.float32 else 1]

    def read_steps(self) -> list[int]:
        return [int(x) for x in self.steps.copy_to_host()]

    def write_steps(self, steps: list[int]) -> None:
        self.steps.copy_to_device(np.array(steps, np.int64))
