"""Step bookkeeping that stays on the GPU: gradient norm, clip factor, skip flag, step counts, lr.

When a GPU step must clip by the global norm, skip non-finite steps or run without ever
synchronising with the host (``capturable``), the host cannot compute the per-step constants: they
depend on a reduction over the gradients, or on a step count that a skipped step must not advance.
A one-thread kernel per slot then computes them on the device, with the very function the host
uses (``kernels.rules``), into a small constants array that the update kernel reads.

The arrays and kernels are the backend's (``device_array``, ``device_sumsq``, ``device_prepare``,
``write_device``): Numba CUDA's on numba-cuda, CuPy's own on cupy, each on the stream where that
backend's update kernels run, so a step captured in a CUDA graph holds them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuadam.kernels.rules import N_CONSTANTS


class DeviceSteps:
    """The device arrays of one optimizer's device-side bookkeeping, on ``backend``.

    Step counts and constants are kept per *slot*: the params of one group that share a step count
    (all of them, unless a loaded state gave them different counts). Every step advances or skips
    all params together, so the slots set at construction or load hold until the next load.
    """

    def __init__(self, n_groups: int, lrs: list[float] | None, backend: Any) -> None:
        self._be = backend
        self.sums = backend.device_array(np.zeros(2, np.float64))  # sum of squares, count of inf/NaN
        # lr >= 0 replaces the host's lr (capturable); -1 means: use the host's value
        self.lr = backend.device_array(np.array(lrs if lrs is not None else [-1.0] * n_groups, np.float64))
        self._lr_host = list(lrs) if lrs is not None else None
        self.norm = backend.device_array(np.zeros(1, np.float64))
        self.skipped = backend.device_array(np.zeros(1, np.int64))
        self.set_slots([0] * n_groups)

    def set_slots(self, steps: list[int]) -> None:
        """One step count per slot, on the device, and a constants row per slot (allocated here,
        at construction or load, never in a step)."""
        be = self._be
        self.steps = be.device_array(np.array(steps, np.int64))
        c32 = be.device_array(np.zeros((len(steps), N_CONSTANTS), np.float32))
        c64 = be.device_array(np.zeros((len(steps), N_CONSTANTS), np.float64))
        self.consts32, self.consts64 = c32, c64  # every slot's row (gpuadam.torch scales them on the device)
        self._consts = [(c32[s], c64[s]) for s in range(len(steps))]

    def upload(self, host: np.ndarray) -> Any:
        """A device copy of a small host array (a FlatBuffer's valid counts), made outside ``step()``."""
        return self._be.device_array(host)

    def sumsq(self, g: Any, fmt: int | None, inv_scale: float, valid: Any = None, stream: int | None = None) -> None:
        """Add ``g``'s sum of squares and inf/NaN count to ``sums``, on ``stream`` (a CUDA stream handle;
        None: the backend's own, where its updates run)."""
        self._be.device_sumsq(g, self.sums, fmt, inv_scale, valid, stream=stream)

    def sync_lr(self, group: int, lr: float) -> None:
        """Upload a changed lr (capturable). A copy from host memory, which a graph being captured
        cannot hold: a captured step keeps ``lr`` unchanged, and a schedule writes ``self.lr``."""
        if self._lr_host is not None and self._lr_host[group] != lr:
            self._be.write_device(self.lr, group, lr)
            self._lr_host[group] = lr

    def prepare(self, slot: int, group: int, hyper: Any, inv_scale: float, max_norm: float,
                skip_nonfinite: bool, host_step: int, last: bool, stream: int | None = None) -> None:
        c32, c64 = self._consts[slot]
        self._be.device_prepare(
            type(hyper).constants_fn, self.sums, hyper.scalars(), inv_scale, max_norm, skip_nonfinite, self.lr,
            group, self.steps, slot, c32, c64, self.norm, self.skipped, last, host_step, stream=stream,
        )

    def constants(self, slot: int, dtype: np.dtype) -> Any:
        return self._consts[slot][0 if dtype == np.float32 else 1]

    def read_steps(self) -> list[int]:
        """The step count of every slot (a copy to the host: it synchronises)."""
        return [int(x) for x in self._be.to_host(self.steps)]

    def read_skipped(self) -> int:
        """Steps skipped on the device (a copy to the host: it synchronises)."""
        return int(self._be.to_host(self.skipped)[0])
