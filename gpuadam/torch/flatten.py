"""``flatten_parameters``: a model's params (and their gradients) in one buffer per dtype and device.

Each param's ``data`` becomes a view of one contiguous, 64-byte aligned buffer, at an offset that is a
multiple of ``flat.ALIGN`` elements (the layout of ``gpuadam.FlatBuffer``: zero padding between the
views), and its ``grad`` a view of a gradient buffer of the same layout, allocated right away. A
``gpuadam.torch`` optimizer whose group holds a whole buffer's params, in order, all with those
gradients, steps them with one kernel launch over the buffers. The gradients must stay those views:
``zero_grad(set_to_none=False)``. After ``zero_grad()`` (torch's default, ``set_to_none=True``) the
next backward allocates fresh gradients, and the step is one launch per param again (correct, slower).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from gpuadam.arrays import aligned_zeros
from gpuadam.flat import ALIGN, FlatBuffer

#: param -> (its FlatParams, its index there); weak, so a dropped model's params go
_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ALIGN_BYTES = 64


class FlatParams:
    """The buffers of a set of params of one dtype and device: ``data`` and ``grad`` (1-D, zero
    padded), each param's ``offsets``/``sizes``/``shapes`` in elements; ``valid`` masks the padding
    for reductions (per ``flat.ALIGN`` elements, how many belong to a param)."""

    def __init__(self, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device) -> None:
        self.shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]
        self.offsets = []
        end = 0
        for n in self.sizes:
            self.offsets.append(end)
            end += -(-n // ALIGN) * ALIGN
        self.size = end
        self.dtype, self.device = dtype, device
        self.data = zeros(end, dtype, device)
        self.grad = zeros(end, dtype, device)
        valid = np.zeros(end // ALIGN, np.uint8)
        for offset, n in zip(self.offsets, self.sizes):
            valid[offset // ALIGN : (offset + n) // ALIGN] = ALIGN
            if n % ALIGN:
                valid[(offset + n) // ALIGN] = n % ALIGN
        self.valid = valid

    def view(self, whole: torch.Tensor, index: int) -> torch.Tensor:
        """Param ``index``'s view of ``whole`` (a buffer of this layout), in its shape."""
        offset = self.offsets[index]
        return whole[offset : offset + self.sizes[index]].view(self.shapes[index])

    def flat_buffers(self) -> tuple[FlatBuffer, FlatBuffer]:
        """``(params, grads)``: ``gpuadam.FlatBuffer``s over ``data`` and ``grad`` (no copy), for the
        gpuadam API that takes FlatBuffers, e.g. ``ShardedOptimizer(gpuadam.Adam, params, group)``
        stepped with ``grads`` after each backward (``zero_grad(set_to_none=False)`` keeps them)."""
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"flat_buffers: float32 or float64 params, got {self.dtype} (a FlatBuffer holds "
                            "NumPy dtypes)")
        dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        device = "cpu" if self.device.type == "cpu" else "cuda"

        def over(t: torch.Tensor) -> FlatBuffer:
            return FlatBuffer(self.shapes, dtype, device, data=t.detach().numpy() if device == "cpu" else t.detach())

        return over(self.data), over(self.grad)

    def __len__(self) -> int:
        return len(self.sizes)

    def __repr__(self) -> str:
        return f"FlatParams({len(self)} params, {self.size} elements, {self.dtype}, {self.device})"


def zeros(size: int, dtype: torch.dtype, device: torch.device, fill: float = 0.0) -> torch.Tensor:
    """A 1-D tensor of ``size`` elements filled with ``fill``, starting on a 64-byte boundary."""
    if device.type == "cpu":
        bits = {torch.bfloat16: np.int16}.get(dtype)
        host = aligned_zeros(size, bits or torch.empty(0, dtype=dtype).numpy().dtype)
        t = torch.from_numpy(host)
        t = t.view(dtype) if bits else t
    else:  # torch's CUDA caching allocator hands out 512-byte aligned blocks
        t = torch.zeros(size, dtype=dtype, device=device)
    if t.data_ptr() % _ALIGN_BYTES:
        raise RuntimeError(f"flatten_parameters: the {dtype} buffer on {device} is not 64-byte aligned")
    if fill:
        t.fill_(fill)
    return t


def _param_lists(module_or_params: Any) -> list[list[torch.Tensor]]:
    if isinstance(module_or_params, torch.nn.Module):
        return [list(module_or_params.parameters())]
    if isinstance(module_or_params, torch.Tensor) or not isinstance(module_or_params, Iterable):
        raise TypeError("flatten_parameters: expected a torch.nn.Module, an iterable of params or of param "
                        f"groups (dicts), got {type(module_or_params).__name__}")
    items = list(module_or_params)
    if items and all(isinstance(g, dict) for g in items):
        return [list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]] for g in items]
    if any(isinstance(g, dict) for g in items):
        raise TypeError("flatten_parameters: expected all params or all param groups (dicts), got a mix")
    return [items]


def flatten_parameters(module_or_params: Any) -> list[FlatParams]:
    """Move the params that require grad into one buffer per (dtype, device), per param group.

    ``module_or_params``: a module (all its params), an iterable of params, or of param groups as an
    optimizer takes them (``{"params": [...], ...}``: a buffer per group, so that each group steps
    with one launch). ``p.data`` becomes a view of the buffer (values kept) and ``p.grad`` a view of
    its gradient buffer (zero, or the gradient it had). Flatten before making the optimizer, and
    zero the gradients with ``zero_grad(set_to_none=False)``. Returns the buffers, in order.
    """
    seen: set[int] = set()
    out = []
    for params in _param_lists(module_or_params):
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"flatten_parameters: param {i}: expected a tensor, got {type(p).__name__}")
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p.layout != torch.strided or not p.dtype.is_floating_point:
                raise ValueError(f"flatten_parameters: param {i}: expected a dense floating-point tensor, got "
                                 f"{p.layout} {p.dtype}")
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), group in by_kind.items():
            buf = FlatParams([p.shape for p in group], dtype, device)
            with torch.no_grad():
                for k, p in enumerate(group):
                    data = buf.view(buf.data, k)
                    data.copy_(p.detach())
                    grad = buf.view(buf.grad, k)
                    if p.grad is not None:
                        grad.copy_(p.grad)
                    p.data = data
                    p.grad = grad
                    _owner[p] = (buf, k)
            out.append(buf)
    return out


def owner(p: torch.Tensor) -> tuple[FlatParams, int] | None:
    """``(buffer, index)`` when ``p`` was flattened and still lives in its buffer; None otherwise."""
    entry = _owner.get(p)
    if entry is None:
        return None
    buf, k = entry
    if p.data_ptr() != buf.data.data_ptr() + buf.offsets[k] * buf.data.element_size():
        return None
    return entry


def is_grad_view(buf: FlatParams, k: int, g: torch.Tensor) -> bool:
    """Whether ``g`` is param ``k``'s view of ``buf.grad``."""
    return g.data_ptr() == buf.grad.data_ptr() + buf.offsets[k] * buf.grad.element_size()
