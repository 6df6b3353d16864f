"""A param's kernel views (param, state buffers, flattened whole buffers) and its step count, kept
between steps while the param, its state and its memory are the ones seen: a step then skips the
checks and array conversions it made the first time."""

from __future__ import annotations

from typing import Any

import torch

from gpuadam.arrays import HOST
from gpuadam.torch import flatten, lean_state
from gpuadam.torch.devices import HALF, kernel_view


def viewed(g: Any, backend: Any) -> Any:
    """A gradient's kernel view (a flattened param's gradient is kept as its tensor until needed)."""
    return kernel_view(g, backend) if isinstance(g, torch.Tensor) else g


#: The counts a float holds exactly: 2**24 (float32), 2**53 (float64); past them ``step`` is read back.
EXACT = {torch.float32: 2 ** 24, torch.float64: 2 ** 53}


class Views:
    """A param's flat kernel views (param, then its state buffers) and its step count, valid while the
    param's memory, dtype and shape, its state dict, buffer tensors and ``step`` are the ones seen;
    ``flat``: this optimizer's whole state buffers when the param and its state are views of them."""

    __slots__ = ("p", "ptr", "shape", "dtype", "device", "cpu", "cpu_float", "fmt", "master", "lean", "state",
                 "names", "buffers", "ptrs", "arrays", "step_tensor", "step_array", "step_version", "step", "flat",
                 "flat_arrays", "flat_grad", "entry", "grad_ptr", "state_arrays")

    def __init__(self, p: torch.Tensor, state: dict, names: tuple[str, ...], step: int, backend: Any,
                 flat_state: dict) -> None:
        data = p.detach()
        self.p, self.ptr, self.shape, self.dtype, self.device = p, data.data_ptr(), data.shape, data.dtype, data.device
        self.cpu = data.is_cpu
        on_host = backend.kind == HOST  # else the device keeps the counts: never read here
        self.cpu_float = self.cpu and on_host and data.dtype not in HALF
        self.fmt = HALF.get(data.dtype)
        self.master = "master" in names
        self.lean = lean_state.kind_of(names)  # a lean format: its kernel runs in place of the rule's
        self.state, self.names = state, names
        self.buffers = tuple(state[n] for n in names)
        self.ptrs = tuple(t.data_ptr() for t in self.buffers)
        self.arrays = (kernel_view(data, backend), *(kernel_view(t, backend) for t in self.buffers))
        self.state_arrays = self.arrays[1:]
        st = state.get("step")
        self.step_tensor = st if isinstance(st, torch.Tensor) and st.dim() == 0 else None
        # written through NumPy, which leaves ``_version`` alone: a change by torch still shows
        self.step_array = st.numpy() if self.step_tensor is not None and on_host else None
        self.step_version = st._version if self.step_tensor is not None and on_host else None
        # the count, where the tensor holds it exactly (else it is read back at each step)
        self.step = None
        if (on_host and self.step_tensor is not None and float(st.item()) == step
                and step < EXACT[st.dtype]):
            self.step = step
        self.flat = self.flat_arrays = self.flat_grad = self.grad_ptr = None
        entry = self.entry = flatten.owner(p)
        if entry is not None:
            self.grad_ptr = entry[0].grad.data_ptr() + entry[0].offsets[entry[1]] * entry[0].grad.element_size()
        whole = flat_state.setdefault(entry[0], {}) if entry is not None else None
        if whole is not None and all(n in whole and t.data_ptr() == whole[n].data_ptr()
                                     + entry[0].offsets[entry[1]] * whole[n].element_size()
                                     for n, t in zip(names, self.buffers)):
            buf = entry[0]
            self.flat = whole
            self.flat_arrays = (kernel_view(buf.data, backend), *(kernel_view(whole[n], backend) for n in names))
            self.flat_grad = kernel_view(buf.grad, backend)

    def valid(self, p: torch.Tensor, state: Any, names: tuple[str, ...], device: torch.device) -> bool:
        if (p.data_ptr() != self.ptr or state is not self.state or names != self.names
                or p.dtype is not self.dtype or p.shape != self.shape or not p.is_contiguous()
                or p.is_cpu is not self.cpu or (not self.cpu and p.device != device)):
            return False
        for n, t, ptr in zip(names, self.buffers, self.ptrs):
            if state.get(n) is not t or t.data_ptr() != ptr:
                return False
        st = self.step_tensor
        return st is None or (state.get("step") is st
                              and (self.step_version is None or st._version == self.step_version))
