"""Where a ``gpuadam.torch`` step runs: the backend for the params' device, the kernels' view of a
tensor, and (on a GPU) the stream a launch goes to.

CPU tensors reach the kernels as NumPy views (``.numpy()``, no copy). CUDA tensors go through the
``__cuda_array_interface__`` of the detached tensor to the numba-cuda or cupy backend. torch's
interface (version 2) names no stream, and torch's kernels run on its current stream, so ours are
launched there too (``torch.cuda.current_stream(device).cuda_stream``): in order with the backward
that wrote the gradients, without a synchronisation. float16 and bfloat16 reach the half kernels as
their 16-bit patterns (uint16; bfloat16 through an int16 view: no array interface has bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gpuadam import backends
from gpuadam.arrays import DEVICE, HOST, ArrayInfo
from gpuadam.kernels.lowp import BFLOAT16, FLOAT16

#: The half formats of the kernels, by torch dtype.
HALF = {torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def backend_for(device: torch.device, requested: str | None) -> Any:
    """The backend that steps tensors on ``device``: Numba CPU for ``cpu``; for ``cuda``, numba-cuda
    (else cupy), or ``requested``; a clear error for any other device."""
    if device.type == "cpu":
        kind = HOST
    elif device.type == "cuda":
        kind = DEVICE
    else:
        raise ValueError(f"params on {device}: gpuadam.torch steps cpu and cuda tensors")
    return backends.choose(requested, ArrayInfo(kind, device.index, (1,), np.dtype(np.float32), True, True))


def kernel_view(t: torch.Tensor, backend: Any) -> Any:
    """The 1-D array the kernels take over ``t``'s memory (contiguous ``t``; half as uint16 bits)."""
    t = t.detach()
    half = t.dtype in HALF
    if t.dtype is torch.bfloat16:
        t = t.view(torch.int16)
    if t.device.type == "cpu":
        a = t.numpy().reshape(-1)
    else:
        a = backend.flat(t)
    return a.view(np.uint16) if half else a


def torch_view(a: Any, device: torch.device) -> torch.Tensor:
    """A torch tensor over device array ``a``'s memory (its ``__cuda_array_interface__``, no copy), so
    torch ops on ``device``'s current stream can read and write the device bookkeeping."""
    t = torch.as_tensor(a, device=device)
    if t.data_ptr() != a.__cuda_array_interface__["data"][0]:  # a copy would be silently stale
        raise RuntimeError(f"torch.as_tensor copied a {type(a).__name__} instead of viewing its memory")
    return t


def compute_dtype(dtype: torch.dtype) -> np.dtype:
    """The dtype the kernels compute ``dtype`` params in (float32 for the half formats)."""
    return _NP.get(dtype, np.dtype(np.float32))


def stream_of(device: torch.device, current_stream: Callable[[Any], Any] | None = None) -> int | None:
    """The handle of torch's current stream on ``device`` (None on the CPU): where a launch goes."""
    if device.type != "cuda":
        return None
    current_stream = current_stream or torch.cuda.current_stream
    return int(current_stream(device).cuda_stream)
