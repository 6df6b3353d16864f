"""gpuadam: fused, in-place Adam-family optimizer steps on GPU (Numba CUDA, CuPy) and CPU (Numba)."""

from gpuadam.backends import BackendStatus, BackendUnavailable, available_backends
from gpuadam.flat import FlatBuffer
from gpuadam.functional import adam_step
from gpuadam.optim import Optimizer
from gpuadam.optimizers import SGD, Adagrad, Adam, Adamax, AdamW, Lion, NAdam, RAdam, RMSprop

__all__ = [
    "Adam",
    "AdamW",
    "Adagrad",
    "Adamax",
    "Lion",
    "NAdam",
    "RAdam",
    "RMSprop",
    "SGD",
    "FlatBuffer",
    "Optimizer",
    "adam_step",
    "available_backends",
    "BackendStatus",
    "BackendUnavailable",
]
__version__ = "0.1.0"
