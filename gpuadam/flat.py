"""FlatBuffer: one allocation holding many tensors, so a step over all of them is one kernel launch.

Each tensor's view starts at a multiple of ``ALIGN`` elements (64 bytes for float32, 128 for
float64), so every view is as aligned as a fresh allocation's cache lines and vector loads. The
padding between views is zero and stays zero under every rule here (a zero gradient moves nothing,
decay keeps zero at zero), so a kernel may sweep the whole buffer, padding included.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.arrays import HOST, aligned_zeros, describe

ALIGN = 16

# id(view) -> (buffer, index). A buffer holds its views, so while it lives their ids are theirs;
# the weak reference lets a dropped buffer (and the ids of its views) go.
_owners: dict[int, tuple[weakref.ref, int]] = {}


def _forget(ids: list[int]) -> None:
    for i in ids:
        _owners.pop(i, None)


class FlatBuffer:
    """One contiguous 1-D ``data`` buffer and a view into it per tensor, shaped as asked.

    ``device="cpu"`` allocates a NumPy array, ``device="cuda"`` a device array of the first GPU
    backend that can run here (a Numba CUDA array, else a CuPy array: CuPy, PyTorch and Numba all
    read either through ``__cuda_array_interface__``).
    """

    def __init__(self, shapes: Sequence[Sequence[int] | int], dtype: Any = np.float32, device: str = "cpu", *,
                 data: Any = None) -> None:
        """``data``: instead of allocating, view this existing 1-D array (NumPy, or any
        ``__cuda_array_interface__``), contiguous, writeable and of exactly the layout's size and
        ``dtype`` on ``device``: memory another library owns, e.g. the buffers of
        ``gpuadam.torch.flatten_parameters`` (whose layout is this one)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        self.shapes = _checked_shapes(shapes)
        self.dtype = np.dtype(dtype)
        self._backend = backends.device_backend("FlatBuffer(device='cuda')") if device == "cuda" else None
        self.device = device
        self.offsets: list[int] = []
        end = 0
        for shape in self.shapes:
            self.offsets.append(end)
            end += -(-int(np.prod(shape)) // ALIGN) * ALIGN
        self.size = end
        self._valid: np.ndarray | None = None
        if data is not None:
            self.data = self._existing(data)
        elif self._backend is None:
            self.data = aligned_zeros(end, self.dtype)
        else:
            self.data = self._backend.zeros(end, self.dtype)
        self.views = [
            self.data[o : o + int(np.prod(s))].reshape(s) for o, s in zip(self.offsets, self.shapes)
        ]
        ref = weakref.ref(self)
        ids = [id(v) for v in self.views]
        for index, i in enumerate(ids):
            _owners[i] = (ref, index)
        weakref.finalize(self, _forget, ids)

    def _existing(self, data: Any) -> Any:
        info = describe(data)
        want = f"a contiguous, writeable 1-D {self.device} array of {self.size} {self.dtype} (the layout's size)"
        if info is None:
            raise TypeError(f"data: expected {want}, got {type(data).__name__}")
        if ((info.kind == HOST) != (self.device == "cpu") or info.shape != (self.size,) or info.dtype != self.dtype
                or not info.contiguous or not info.writeable):
            where = "host" if info.kind == HOST else "cuda"
            raise ValueError(f"data: expected {want}, got a{'' if info.contiguous else ' strided'}"
                             f"{'' if info.writeable else ' read-only'} {where} array of shape {info.shape} "
                             f"and dtype {info.dtype}")
        return data if self._backend is None else self._backend.flat(data)

    @classmethod
    def from_arrays(cls, arrays: Sequence[Any]) -> FlatBuffer:
        """A buffer with the arrays' shapes and (common) dtype, on their device, holding copies of them."""
        if isinstance(arrays, (str, bytes)) or describe(arrays) is not None or not isinstance(arrays, Iterable):
            raise TypeError(f"arrays: expected a list of arrays, got {type(arrays).__name__}")
        arrays = list(arrays)  # read twice below: a generator would be empty the second time
        if not arrays:
            raise ValueError("arrays: expected at least one array, got an empty list (the dtype and the "
                             "device come from the arrays)")
        infos = [describe(a) for a in arrays]
        for i, info in enumerate(infos):
            if info is None:
                raise TypeError(f"array {i}: expected a NumPy or CUDA device array, got {type(arrays[i]).__name__}")
            if info.dtype != infos[0].dtype or info.kind != infos[0].kind:
                raise ValueError(
                    f"array {i}: expected a {infos[0].kind} array of dtype {infos[0].dtype} like array 0, "
                    f"got a {info.kind} array of dtype {info.dtype}"
                )
        buf = cls([info.shape for info in infos], infos[0].dtype, "cpu" if infos[0].kind == HOST else "cuda")
        for view, a in zip(buf.views, arrays):
            if buf.device == "cpu":
                np.copyto(view, a)
            else:
                buf._backend.copy_device(view, a)
        return buf

    def zeros_like(self) -> FlatBuffer:
        """A zeroed buffer with the same layout: gradients for this one."""
        return FlatBuffer(self.shapes, self.dtype, self.device)

    def same_layout(self, other: FlatBuffer) -> bool:
        return self.shapes == other.shapes and self.dtype == other.dtype and self.device == other.device

    def valid_counts(self) -> np.ndarray:
        """Per granule of ``ALIGN`` elements of ``data``, how many belong to a view (the rest are
        padding): a uint8 host array that lets reductions over the whole buffer skip the padding."""
        if self._valid is None:
            valid = np.zeros(self.size // ALIGN, np.uint8)
            for offset, shape in zip(self.offsets, self.shapes):
                size = int(np.prod(shape))
                valid[offset // ALIGN : (offset + size) // ALIGN] = ALIGN
                if size % ALIGN:
                    valid[(offset + size) // ALIGN] = size % ALIGN
            self._valid = valid
        return self._valid

    def __len__(self) -> int:
        return len(self.views)

    def __repr__(self) -> str:
        return f"FlatBuffer({len(self.views)} tensors, {self.size} elements, {self.dtype}, {self.device})"


def _extent(i: int, x: Any) -> int:
    # int(2.7) would quietly make a (2, 3) tensor of a (2.7, 3) shape: only integers are extents
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"shapes: tensor {i}: expected integer extents, got {type(x).__name__} {x!r}")
    if x < 0:
        raise ValueError(f"shapes: tensor {i}: expected extents >= 0, got {int(x)}")
    return int(x)


def _checked_shapes(shapes: Any) -> list[tuple[int, ...]]:
    """Each tensor's shape as a tuple of ints: an integer is a 1-D extent, a sequence a shape."""
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Iterable):
        raise TypeError(f"shapes: expected a list of shapes, got {type(shapes).__name__} {shapes!r}")
    out = []
    for i, s in enumerate(list(shapes)):
        if isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)):
            out.append((_extent(i, s),))
        elif isinstance(s, (tuple, list)) or (isinstance(s, np.ndarray) and s.ndim == 1):
            out.append(tuple(_extent(i, x) for x in s))
        else:  # a str is a sequence too: "12" would become the shape (1, 2)
            raise TypeError(f"shapes: tensor {i}: expected a shape (a tuple of ints) or an int, "
                            f"got {type(s).__name__} {s!r}")
    return out


def owner(views: Sequence[Any]) -> FlatBuffer | None:
    """The FlatBuffer whose ``views`` are exactly ``views``, in order; None otherwise."""
    if not views:
        return None
    entry = _owners.get(id(views[0]))
    buf = entry[0]() if entry else None
    if buf is None or entry[1] != 0 or len(buf.views) != len(views):
        return None
    if all(a is b for a, b in zip(views, buf.views)):
        return buf
    return None
