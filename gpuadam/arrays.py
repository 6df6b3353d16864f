"""Where an array lives, what it holds, and the checks every tensor passes before a kernel runs.

An array is ``host`` (a NumPy array) or ``device`` (anything exposing ``__cuda_array_interface__``,
or a device array of Numba's CUDA simulator, which has no such interface). Nothing here imports a
GPU library: the description is read from the array's own attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuadam import precision

HOST = "host"
DEVICE = "device"

#: Bytes of a cache line (and of an AVX-512 vector): where every host array we allocate starts.
CACHE_LINE = 64
#: Addresses that agree modulo this many bytes look alike to a CPU's store-to-load check.
PAGE = 4096


def aligned_zeros(size: int, dtype: Any, like: np.ndarray | None = None) -> np.ndarray:
    """A zeroed 1-D host array of ``size`` elements that starts on a 64-byte cache line, or, given
    ``like`` (the param a state array belongs to), at ``like``'s offset within a 4096-byte page.

    NumPy starts a large array 16 bytes past a line (``malloc``'s header), so every 64-byte vector
    load of a streaming kernel straddles two lines. Yet a state array on a line beside a param 16
    bytes past one is slower still: a store to the state then shares its low 12 address bits with
    the load of the param 48 bytes on, and the CPU holds the load back as if it depended on the
    store (4K aliasing). So the state follows its param: on a line beside an aligned param (a
    FlatBuffer's, a torch tensor's), where the param is beside a param 16 bytes past one.
    BENCHMARKS.md has the measurements.
    """
    dtype = np.dtype(dtype)
    nbytes = int(size) * dtype.itemsize
    if like is None:
        period, want = CACHE_LINE, 0
    else:
        period = PAGE if nbytes >= PAGE else CACHE_LINE
        want = like.ctypes.data % period
    raw = np.zeros(nbytes + period, np.uint8)
    start = (want - raw.ctypes.data) % period
    return raw[start : start + nbytes].view(dtype)

def is_simulator_array(x: Any) -> bool:
    """True for a device array of Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return type(x).__module__.startswith("numba.cuda.simulator")


@dataclass(frozen=True)
class ArrayInfo:
    """What validation needs to know about one array, read without copying it."""

    kind: str  # HOST or DEVICE
    device: Any  # None for host; a device id when the array tells it, else "cuda"
    shape: tuple
    dtype: np.dtype
    contiguous: bool
    writeable: bool


def _c_contiguous(shape: tuple, strides: tuple | None, itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != expected:
            return False
        expected *= extent
    return True


def _device_id(x: Any) -> Any:
    device = getattr(x, "device", None)  # CuPy: .device.id; PyTorch: .device.index
    for attr in ("id", "index"):
        value = getattr(device, attr, None)
        if isinstance(value, int):
            return value
    return "cuda"


def _same_device(a: Any, b: Any) -> bool:
    # Numba device arrays do not say which device they are on: only two known ids can differ.
    return a == b or not (isinstance(a, int) and isinstance(b, int))


def describe(x: Any) -> ArrayInfo | None:
    """An ``ArrayInfo`` for a host or device array, or None for anything else."""
    if isinstance(x, np.ndarray):
        return ArrayInfo(HOST, None, x.shape, x.dtype, x.flags.c_contiguous, x.flags.writeable)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        dtype = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        contiguous = _c_contiguous(shape, cai.get("strides"), dtype.itemsize)
        readonly = bool(cai["data"][1])
        return ArrayInfo(DEVICE, _device_id(x), shape, dtype, contiguous, not readonly)
    if is_simulator_array(x):
        host_view = x._ary  # the simulator keeps a NumPy array behind each device array
        return ArrayInfo(
            DEVICE, "cuda", host_view.shape, host_view.dtype,
            host_view.flags.c_contiguous, host_view.flags.writeable,
        )
    return None


def span(x: Any) -> tuple[int, int]:
    """The bytes ``[start, stop)`` a C-contiguous host or device array occupies (empty for size 0)."""
    if isinstance(x, np.ndarray):
        start = x.__array_interface__["data"][0]
        return start, start + x.nbytes
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:  # a simulator device array: the NumPy array behind it
        return span(x._ary)
    start = cai["data"][0]
    return start, start + int(np.prod(cai["shape"])) * np.dtype(cai["typestr"]).itemsize


def first_overlap(spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The indices ``(i, j)``, ``i < j``, of two spans that share a byte, or None when none do."""
    order = sorted((s for s in range(len(spans)) if spans[s][0] < spans[s][1]), key=lambda s: spans[s][0])
    furthest = None  # the span reaching furthest among those seen
    for s in order:
        if furthest is not None and spans[s][0] < spans[furthest][1]:
            return min(s, furthest), max(s, furthest)
        if furthest is None or spans[s][1] > spans[furthest][1]:
            furthest = s
    return None


def check_apart(named: list[tuple[str, Any]]) -> None:
    """Refuse arrays (named ``(name, array)``) that share memory: an in-place update would read
    values it has already written, or write one element twice."""
    clash = first_overlap([span(x) for _, x in named])
    if clash is not None:
        i, j = clash
        raise ValueError(f"{named[j][0]} shares memory with {named[i][0]}: each array must have its own memory")


def _refuse_subclass(what: str, index: int, x: Any) -> None:
    # The kernels see the memory, not the subclass: a mask would be ignored without a word.
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{what} {index}: expected a plain array, got a masked array (its mask would be "
                        "ignored); pass x.filled(0) or x.data")


def check_param(index: int, p: Any, half_format: int | None = None) -> tuple[ArrayInfo, int | None]:
    """``(ArrayInfo, half format or None)`` of parameter ``index``, or a TypeError/ValueError that
    says what is wrong."""
    info = describe(p)
    if info is None:
        raise TypeError(
            f"param {index}: expected a NumPy array or a CUDA device array, got {type(p).__name__}"
        )
    _refuse_subclass("param", index, p)
    try:
        fmt = precision.half_format(info.dtype, half_format)
    except TypeError as exc:
        raise TypeError(f"param {index}: {exc}") from None
    if not info.contiguous:
        raise ValueError(f"param {index}: expected a C-contiguous array, got a strided view")
    if not info.writeable:
        raise ValueError(f"param {index}: expected a writeable array, got a read-only one")
    return info, fmt


def check_like(what: str, index: int, x: Any, param: ArrayInfo, *, writeable: bool) -> None:
    """Check that ``x`` (a gradient or a state array) matches its parameter in every respect."""
    info = describe(x)
    if info is None:
        raise TypeError(
            f"{what} {index}: expected an array like its param ({_what_info(param)}), "
            f"got {type(x).__name__}"
        )
    _refuse_subclass(what, index, x)
    if info.kind != param.kind or not _same_device(info.device, param.device):
        where = "host" if param.kind == HOST else f"device {param.device}"
        got = "host" if info.kind == HOST else f"device {info.device}"
        raise ValueError(f"{what} {index}: expected an array on the {where} like its param, got one on the {got}")
    if info.shape != param.shape:
        raise ValueError(f"{what} {index}: expected shape {param.shape} like its param, got {info.shape}")
    if info.dtype != param.dtype:
        raise TypeError(f"{what} {index}: expected dtype {param.dtype} like its param, got {info.dtype}")
    if not info.contiguous:
        raise ValueError(f"{what} {index}: expected a C-contiguous array, got a strided view")
    if writeable and not info.writeable:
        raise ValueError(f"{what} {index}: expected a writeable array, got a read-only one")


def _what_info(info: ArrayInfo) -> str:
    return f"{info.kind} array of shape {info.shape} and dtype {info.dtype}"


def check_grad_count(count: int, grads: Any) -> None:
    """Check that ``grads`` is a sequence of ``count`` items (each is checked with ``check_like``)."""
    if grads is None or isinstance(grads, (str, bytes)) or not hasattr(grads, "__len__"):
        raise TypeError(f"grads: expected a sequence of {count} arrays, got {type(grads).__name__}")
    if isinstance(grads, (Mapping, AbstractSet)):
        # a dict would be indexed by its keys and a set not at all: neither lines up with the params
        raise TypeError(f"grads: expected a sequence of {count} arrays aligned with the params, "
                        f"got a {type(grads).__name__}")
    if describe(grads) is not None:
        raise TypeError(f"grads: expected a sequence of {count} arrays aligned with the params, got one array")
    if len(grads) != count:
        raise ValueError(f"grads: expected {count} arrays (one per param), got {len(grads)}")
