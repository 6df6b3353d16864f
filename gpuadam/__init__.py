"""gpuadam: fused, in-place Adam-family optimizer steps on GPU (Numba CUDA, CuPy) and CPU (Numba)."""

from gpuadam.backends import BackendStatus, BackendUnavailable, available_backends
from gpuadam.family import SGD, Adagrad, Adamax, Lion, NAdam, RAdam, RMSprop
from gpuadam.flat import FlatBuffer
from gpuadam.functional import adam_step
from gpuadam.optim import Adam, AdamW, Optimizer

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
