"""Data-parallel training with sharded optimizer state (ZeRO stage 1) over MPI, torch.distributed
and NCCL: ``ShardedOptimizer`` and the communicator adapters it picks from ``comm``.

A layer above ``gpuadam.optim`` and ``gpuadam.optimizers``: nothing below imports it.
"""

from gpuadam.distributed.comms import (
    Communicator,
    CupyNcclComm,
    MPIComm,
    SingleProcess,
    TorchComm,
    communicator,
)
from gpuadam.distributed.layout import ShardLayout
from gpuadam.distributed.sharded import ShardedOptimizer

__all__ = [
    "ShardedOptimizer",
    "ShardLayout",
    "Communicator",
    "communicator",
    "SingleProcess",
    "MPIComm",
    "TorchComm",
    "CupyNcclComm",
]
