"""ShardedOptimizer: each rank keeps the optimizer state of one slice of the parameters (ZeRO stage 1)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.arrays import aligned_zeros
from gpuadam.distributed import checkpoints
from gpuadam.distributed.comms import Communicator, _copy, communicator
from gpuadam.distributed.layout import ShardLayout
from gpuadam.flat import ALIGN, FlatBuffer
from gpuadam.hyper import check_flag, check_positive
from gpuadam.optim import Optimizer


class ShardedOptimizer:
    """``optimizer_class`` over this rank's slice of ``params``, stepped data-parallel.

    ``params``: a FlatBuffer that every rank holds in full (the same layout on every rank). Rank
    ``r`` of ``comm`` (see ``gpuadam.distributed.communicator``) owns ``layout.bounds(r)``, a
    contiguous slice of ``params.data`` of at most ``layout.length`` elements, and an ordinary
    ``optimizer_class`` (built with ``**hyperparameters``, every option included) keeps the state of
    that slice only. ``step(grads)`` reduce-scatters the ranks' gradients into the slice (their mean,
    or with ``average=False`` their sum), steps the slice, and all-gathers the updated slices into
    every rank's ``params``. Every rank must call ``step``, ``save`` and ``load`` together.
    """

    def __init__(self, optimizer_class: type, params: FlatBuffer, comm: Any = None, *, average: bool = True,
                 **hyperparameters: Any) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"optimizer_class: expected a gpuadam optimizer class (e.g. gpuadam.Adam), "
                            f"got {optimizer_class!r}")
        if not isinstance(params, FlatBuffer):
            raise TypeError(f"params: expected a FlatBuffer (every rank holds all parameters), "
                            f"got {type(params).__name__}")
        self.average = check_flag("average", average)
        self.comm: Communicator = communicator(comm)
        self.params = params
        self.layout = ShardLayout.of(params.size, self.comm.size)
        self._start, self._stop = self.layout.bounds(self.comm.rank)
        n = self.layout.length
        # A slice of the full length is stepped in place; a short one (the buffer's tail, or
        # nothing) in a padded copy of its own, refreshed from params before each step.
        self._staged = self._stop - self._start != n
        if self._staged:
            self._shard = self._zeros(n, params.dtype)
            _copy(self._shard[: self._stop - self._start], params.data[self._start : self._stop])
        else:
            self._shard = params.data[self._start : self._stop]
        self._grad = self._zeros(n, params.dtype)
        self._kwargs = dict(hyperparameters)
        self.optimizer: Optimizer = optimizer_class([self._shard], **hyperparameters)
        # the norm and the non-finite check skip the buffer's padding, as a plain optimizer's do
        granules = params.valid_counts()[self._start // ALIGN : self._stop // ALIGN]
        valid = np.zeros(n // ALIGN, np.uint8)
        valid[: granules.size] = granules
        self.optimizer.shard(self.comm.rank * n, self.comm.all_reduce, valid)

    def _zeros(self, n: int, dtype: np.dtype) -> Any:
        if self.params.device == "cpu":
            return aligned_zeros(n, dtype)
        return backends.device_backend("ShardedOptimizer").zeros(n, dtype)

    # --- stepping ----------------------------------------------------------------------------
    def step(self, grads: FlatBuffer, *, grad_scale: float | None = None, max_grad_norm: float | None = None) -> None:
        """Step on this rank's gradients ``grads`` (a FlatBuffer of ``params``' layout), as
        ``Optimizer.step``: clipping by the norm of the reduced gradients of all ranks together, and
        with ``skip_nonfinite`` every rank skips when any reduced gradient is inf or NaN."""
        if not isinstance(grads, FlatBuffer) or not grads.same_layout(self.params):
            got = repr(grads) if isinstance(grads, FlatBuffer) else type(grads).__name__
            raise ValueError(f"grads: expected a FlatBuffer of the params' layout ({self.params!r}), got {got}")
        # checked here, before the first collective: a rank that refused later would hang the others
        scale = 1.0 if grad_scale is None else check_positive("grad_scale", grad_scale)
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        if self.average:
            scale *= self.comm.size  # the mean: the kernel divides by grad_scale anyway
        self.comm.reduce_scatter(grads.data, self._grad, self.layout)
        if self._staged:
            _copy(self._shard[: self._stop - self._start], self.params.data[self._start : self._stop])
        self.optimizer.step([self._grad], grad_scale=scale, max_grad_norm=max_grad_norm)
        self.comm.all_gather(self._shard, self.params.data, self.layout)

    # --- what the inner optimizer knows ------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The slice's one param group: set ``lr`` (or any hyperparameter) here, on every rank."""
        return self.optimizer.param_groups

    @property
    def steps(self) -> int:
        return self.optimizer.steps[0]

    @property
    def steps_skipped(self) -> int:
        return self.optimizer.steps_skipped

    @property
    def last_grad_norm(self) -> Any:
        """The norm of all ranks' reduced gradients at the last step that computed it."""
        return self.optimizer.last_grad_norm

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank keeps: about 1/N of an unsharded optimizer's."""
        return sum(int(a.nbytes) for a in self.optimizer.state[0].values())

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write a new ``directory``: each rank's slice of the state and one manifest; every rank
        calls it. Atomic: the directory appears complete or not at all (see ``gpuadam.sharded_checkpoint``)."""
        checkpoints.save(self, os.fspath(directory))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a sharded checkpoint directory saved at any rank count, or a plain optimizer's
        checkpoint file of the same params; every rank calls it. Refused on every rank, changing
        nothing, when it does not fit on any rank."""
        checkpoints.load(self, os.fspath(path))

    def __repr__(self) -> str:
        return (f"ShardedOptimizer({type(self.optimizer).__name__}, rank {self.comm.rank} of {self.comm.size}, "
                f"elements {self._start}..{self._stop} of {self.layout.size})")
