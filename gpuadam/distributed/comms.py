"""Communicators: the three collectives a sharded step needs, adapted from the engines people run.

``communicator(comm)`` picks the adapter from what ``comm`` is: an ``mpi4py`` communicator, a
``torch.distributed`` process group (or the ``torch.distributed`` module: its default group), a
CuPy NCCL communicator, or ``None`` for one process. Every adapter offers the same calls on 1-D
buffers, for a ``ShardLayout`` of the whole buffer:

- ``reduce_scatter(full, shard, layout)``: ``shard[:count]`` = the sum over ranks of this rank's
  part of ``full`` (``shard`` is ``layout.length`` long; the rest of it is left as it is);
- ``all_gather(shard, full, layout)``: every rank's ``shard[:count]`` written to its part of ``full``;
- ``all_reduce(x)``: a small float64 array summed over ranks, in place (host or device);
- ``sum_host(values)``: a small host array of float64 summed over ranks (checkpoint agreement).

Host buffers (NumPy) work with MPI and gloo; device buffers (Numba/CuPy/torch CUDA arrays) with
CUDA-aware MPI (the adapter waits for the device first: MPI does not order itself after a stream),
NCCL through torch (on torch's current stream) and CuPy's NCCL (on CuPy's current stream).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.arrays import span
from gpuadam.distributed.layout import ShardLayout


def communicator(comm: Any) -> Communicator:
    """The adapter for ``comm``; a ``Communicator`` is returned as it is."""
    if comm is None:
        return SingleProcess()
    if isinstance(comm, Communicator):
        return comm
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        return MPIComm(comm)
    if getattr(comm, "__name__", "") == "torch.distributed" or module.startswith("torch"):
        return TorchComm(comm)
    if module.startswith("cupy") and hasattr(comm, "rank_id"):
        return CupyNcclComm(comm)
    raise TypeError(f"comm: expected an mpi4py communicator, a torch.distributed process group, a CuPy "
                    f"NcclCommunicator or None (one process), got {type(comm).__module__}.{type(comm).__name__}")


class Communicator:
    """Base of the adapters: ``rank`` and ``size``, and the collectives the module docstring lists."""

    name = "?"
    rank = 0
    size = 1

    def reduce_scatter(self, full: Any, shard: Any, layout: ShardLayout) -> None:
        raise NotImplementedError

    def all_gather(self, shard: Any, full: Any, layout: ShardLayout) -> None:
        raise NotImplementedError

    def all_reduce(self, x: Any) -> None:
        raise NotImplementedError

    def sum_host(self, values: np.ndarray) -> np.ndarray:
        out = np.array(values, np.float64)
        self.all_reduce(out)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank {self.rank} of {self.size})"


def _is_host(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _copy(dst: Any, src: Any) -> None:
    """``dst[...] = src`` for two 1-D arrays of one kind (host, or CUDA arrays of any library)."""
    if dst.size == 0:
        return
    if _is_host(dst):
        np.copyto(dst, src)
        return
    backends.device_backend("gpuadam.distributed").copy_device(dst, src)


def _own_part(shard: Any, full: Any, layout: ShardLayout, rank: int) -> None:
    """Write this rank's updated slice into ``full`` when it is not already a view of it."""
    start, stop = layout.bounds(rank)
    if stop > start and not _same_memory(shard, full, start):
        _copy(full[start:stop], shard[: stop - start])


def _same_memory(shard: Any, full: Any, start: int) -> bool:
    return span(shard)[0] == span(full)[0] + start * full.dtype.itemsize


class SingleProcess(Communicator):
    """One process: the collectives are copies (a sharded optimizer of one rank is a plain one)."""

    name = "single"

    def reduce_scatter(self, full: Any, shard: Any, layout: ShardLayout) -> None:
        _copy(shard[: layout.size], full)

    def all_gather(self, shard: Any, full: Any, layout: ShardLayout) -> None:
        _own_part(shard, full, layout, 0)

    def all_reduce(self, x: Any) -> None:
        pass


def _wire_view(a: Any) -> Any:
    # MPI and NCCL through torch know no ml_dtypes bfloat16: its bits travel as uint16 (a gather
    # moves bits; a reduction of half gradients is refused before, where it would need arithmetic)
    if _is_host(a) and a.dtype.isbuiltin == 2 and a.dtype.itemsize == 2:
        return a.view(np.uint16)
    return a


class MPIComm(Communicator):
    """An ``mpi4py`` communicator: ``Reduce_scatter`` with per-rank counts and an in-place
    ``Allgatherv``, so a buffer the ranks do not divide needs no padded copy. Sums float32/float64
    gradients (MPI has no standard half-precision sum)."""

    name = "mpi"

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def _ready(self, a: Any) -> None:
        if not _is_host(a):  # CUDA-aware MPI reads device memory outside any stream: finish the step
            backends.device_backend("gpuadam.distributed").synchronize()

    def reduce_scatter(self, full: Any, shard: Any, layout: ShardLayout) -> None:
        if full.dtype not in (np.float32, np.float64):
            raise TypeError(f"MPI sums float32/float64 gradients, got {full.dtype}; use torch.distributed "
                            "(NCCL or gloo) for half-precision gradients")
        self._ready(full)
        if layout.even:  # equal chunks: the block collective, which MPI libraries tune best
            self.comm.Reduce_scatter_block(full, shard, op=self._MPI.SUM)
            return
        counts = layout.counts()
        self.comm.Reduce_scatter(full, shard[: counts[self.rank]], recvcounts=counts, op=self._MPI.SUM)

    def all_gather(self, shard: Any, full: Any, layout: ShardLayout) -> None:
        _own_part(shard, full, layout, self.rank)
        self._ready(full)
        if layout.even:  # equal chunks: the plain collective, which MPI libraries tune best
            self.comm.Allgather(self._MPI.IN_PLACE, _wire_view(full))
            return
        counts = layout.counts()
        displs = [layout.bounds(r)[0] for r in range(self.size)]
        self.comm.Allgatherv(self._MPI.IN_PLACE, [_wire_view(full), (counts, displs)])

    def all_reduce(self, x: Any) -> None:
        self._ready(x)
        self.comm.Allreduce(self._MPI.IN_PLACE, x, op=self._MPI.SUM)


class TorchComm(Communicator):
    """A ``torch.distributed`` process group (gloo for host buffers, NCCL for CUDA ones).

    An even layout is one ``reduce_scatter_tensor``/``all_gather_into_tensor`` on the buffer
    itself; otherwise the ranks past the buffer's last whole chunk exchange their chunks through a
    small padded tail buffer (at most ``length + 16 * ranks`` elements), allocated once."""

    name = "torch"

    def __init__(self, group: Any) -> None:
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self.group = None if group is dist else group
        if not dist.is_initialized():
            raise ValueError("torch.distributed: call init_process_group first (e.g. run under torchrun)")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._tails: dict[tuple, Any] = {}
        self._nccl = dist.get_backend(self.group) == "nccl"

    def _tensor(self, a: Any) -> Any:
        torch = self._torch
        if isinstance(a, torch.Tensor):
            return a
        if _is_host(a):
            if a.dtype.isbuiltin == 2 and a.dtype.itemsize == 2:  # ml_dtypes bfloat16
                return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(a)
        return torch.as_tensor(a, device="cuda")

    def _tail(self, t: Any, layout: ShardLayout) -> Any:
        key = (layout, t.dtype, t.device)
        tail = self._tails.get(key)
        if tail is None:
            tail = self._torch.zeros((self.size - layout.full_chunks) * layout.length, dtype=t.dtype, device=t.device)
            self._tails[key] = tail
        return tail

    def _chunks(self, t: Any, layout: ShardLayout) -> tuple[list, Any]:
        """Each rank's chunk of the buffer ``t``: views of ``t``, and of the tail buffer past its
        last whole chunk."""
        k, n = layout.full_chunks, layout.length
        chunks = [t[r * n : (r + 1) * n] for r in range(k)]
        if layout.even:
            return chunks, None
        tail = self._tail(t, layout)
        return chunks + list(tail.split(n)), tail

    def reduce_scatter(self, full: Any, shard: Any, layout: ShardLayout) -> None:
        dist = self._dist
        src, dst = self._tensor(full), self._tensor(shard)
        if layout.even:
            # reduce_scatter_single is reduce_scatter_tensor's new name (the old one warns in torch 2.13)
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            scatter(dst, src, op=dist.ReduceOp.SUM, group=self.group)
            return
        chunks, tail = self._chunks(src, layout)
        k = layout.full_chunks * layout.length
        tail[: layout.size - k].copy_(src[k:])
        dist.reduce_scatter(dst, chunks, op=dist.ReduceOp.SUM, group=self.group)

    def all_gather(self, shard: Any, full: Any, layout: ShardLayout) -> None:
        dist = self._dist
        src, dst = self._tensor(shard), self._tensor(full)
        if layout.even:
            # all_gather_single is all_gather_into_tensor's new name (the old one warns in torch 2.13)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(dst, src, group=self.group)
            return
        chunks, tail = self._chunks(dst, layout)
        dist.all_gather(chunks, src, group=self.group)
        k = layout.full_chunks * layout.length
        dst[k:].copy_(tail[: layout.size - k])

    def all_reduce(self, x: Any) -> None:
        t = self._tensor(x)
        if self._nccl and t.device.type != "cuda":  # NCCL reduces device memory only
            d = t.cuda()
            self._dist.all_reduce(d, group=self.group)
            t.copy_(d.cpu())
            return
        self._dist.all_reduce(t, group=self.group)


class CupyNcclComm(Communicator):
    """A ``cupy.cuda.nccl.NcclCommunicator`` over CuPy (or any CUDA) arrays, on CuPy's current
    stream: the collectives queue after the step's kernels with no host synchronisation. An even
    layout is one ``reduceScatter``/``allGather``; otherwise one grouped reduce/broadcast per rank
    over the rank's own (possibly short) part, so no padded copy is needed."""

    name = "cupy-nccl"

    def __init__(self, comm: Any) -> None:
        import cupy
        from cupy.cuda import nccl

        if not getattr(nccl, "available", False):
            raise ValueError("comm: a CuPy NCCL communicator, but CuPy finds no NCCL library here")
        self._cupy = cupy
        self._nccl = nccl
        self.comm = comm
        self.rank = comm.rank_id()
        self.size = comm.size()
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}

    def _type(self, dtype: np.dtype) -> int:
        if dtype.name == "bfloat16" and hasattr(self._nccl, "NCCL_BFLOAT16"):
            return self._nccl.NCCL_BFLOAT16
        try:
            return self._types[np.dtype(dtype)]
        except KeyError:
            raise TypeError(f"NCCL through CuPy: no NCCL type for {dtype}") from None

    @staticmethod
    def _ptr(a: Any, start: int = 0) -> int:
        return a.__cuda_array_interface__["data"][0] + start * a.dtype.itemsize

    def _stream(self) -> int:
        return self._cupy.cuda.get_current_stream().ptr

    def reduce_scatter(self, full: Any, shard: Any, layout: ShardLayout) -> None:
        t, s, total = self._type(full.dtype), self._stream(), self._nccl.NCCL_SUM
        if layout.even:
            self.comm.reduceScatter(self._ptr(full), self._ptr(shard), layout.length, t, total, s)
            return
        self._nccl.groupStart()
        for r in range(self.size):
            start, stop = layout.bounds(r)
            self.comm.reduce(self._ptr(full, start), self._ptr(shard), stop - start, t, total, r, s)
        self._nccl.groupEnd()

    def all_gather(self, shard: Any, full: Any, layout: ShardLayout) -> None:
        t, s = self._type(full.dtype), self._stream()
        if layout.even:
            self.comm.allGather(self._ptr(shard), self._ptr(full), layout.length, t, s)
            return
        _own_part(shard, full, layout, self.rank)
        self._nccl.groupStart()
        for r in range(self.size):
            start, stop = layout.bounds(r)
            self.comm.broadcast(self._ptr(full, start), self._ptr(full, start), stop - start, t, r, s)
        self._nccl.groupEnd()

    def all_reduce(self, x: Any) -> None:
        if _is_host(x):
            d = self._cupy.asarray(x)
            self.all_reduce(d)
            x[...] = d.get()
            return
        self.comm.allReduce(self._ptr(x), self._ptr(x), x.size, self._type(x.dtype), self._nccl.NCCL_SUM,
                            self._stream())
