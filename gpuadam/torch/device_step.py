"""The GPU half of ``gpuadam.torch``'s optimizers: a step of CUDA params that never synchronises.

Each launch's step count and constants are made on the device by ``gpuadam.on_device.DeviceSteps``
(one slot per param; the params of a group that took part in the same steps share one), on torch's
current stream, from the gradients' norm (``max_grad_norm``), the inf/NaN count (``skip_nonfinite``),
GradScaler's ``found_inf`` (a skip) and ``grad_scale`` (folded into the gradient factor, every rule's
constant slot 0) and a tensor ``lr``, all read there with torch ops on views of the device arrays.
``state["step"]`` are then float32 0-d views of the device's counts (torch's layout with ``fused`` or
``capturable``), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
from torch.autograd.graph import increment_version

from gpuadam.on_device import DeviceSteps
from gpuadam.torch import flatten
from gpuadam.torch.devices import compute_dtype, stream_of, torch_view
from gpuadam.torch.views import Views, viewed


class DeviceStepping:
    """Mixed into ``FusedOptimizer``: its GPU step (``_step_device``) and the device bookkeeping."""

    def _step_device(self, work: list, max_norm: dict) -> None:
        """The step of CUDA params, launched on torch's current stream without a host synchronisation:
        each launch's step count, constants, clip factor and skip decision are made on the device
        (``DeviceSteps``) from the gradients' norm, GradScaler's ``found_inf`` (a skip) and ``grad_scale``
        (folded into the gradient factor), and tensor ``lr``s; ``state["step"]`` are float32 views of
        those counts. Capturable in a CUDA graph (a float ``lr`` is captured as it was)."""
        be = self._backend
        stream = stream_of(self._backend_device)
        dev, t = self._device_steps()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        reduce = self.skip_nonfinite or any(max_norm.values())
        self._calls += 1
        self._sync_lrs(t)
        units = []  # (group, hyper, rule, first param's views, arrays, grad, padding mask, params)
        for gi, hyper, rule, items in work:
            for n, (p, g, e, entry) in enumerate(items):
                if e is None:
                    items[n] = (p, g, self._device_views_of(p, rule, hyper), entry)
            for start, stop, buf in self._runs(items, [self._dev_sig[p] for p, *_ in items], hyper, rule):
                e = items[start][2]
                if buf is None:
                    arrays, g, valid = e.arrays, viewed(items[start][1], be), None
                else:
                    arrays, g, valid = e.flat_arrays, e.flat_grad, self._dev_valid[buf]
                units.append((gi, hyper, rule, e, arrays, g, valid, [item[0] for item in items[start:stop]]))
        if reduce:
            for _gi, _hyper, _rule, e, _arrays, g, valid, _ps in units:
                dev.sumsq(g, e.fmt, 1.0, valid, stream=stream)
            if grad_scale is not None:  # the sum of the scaled gradients' squares, unscaled in place
                scale = grad_scale.reshape(1)
                t.sums[:1].div_(scale).div_(scale)
        if found_inf is not None:  # GradScaler's verdict joins (or, without skip_nonfinite, is) the skip count
            if self.skip_nonfinite:
                t.sums[1:].add_(found_inf.reshape(1))
            else:
                t.sums[1:].copy_(found_inf.reshape(1))
        skip = self.skip_nonfinite or found_inf is not None
        # the params of a group that took part in the same steps share one count: one slot (the first's
        # index), prepared once, its count copied to the others on the device
        slots: dict = {}
        for gi, hyper, *_rest, ps in units:
            slots.setdefault((gi, self._dev_sig[ps[0]]), (hyper, []))[1].extend(self._dev_index[p] for p in ps)
        slot_of = {}
        for n, ((gi, _sig), (hyper, ks)) in enumerate(slots.items()):
            dev.prepare(ks[0], gi, hyper, 1.0, max_norm[gi], skip, 0, n == len(slots) - 1, stream=stream)
            if len(ks) > 1:
                if ks[-1] - ks[0] == len(ks) - 1:
                    t.steps[ks[0] + 1 : ks[-1] + 1].copy_(t.steps[ks[0]].expand(len(ks) - 1))
                else:
                    for k in ks[1:]:
                        t.steps[k].copy_(t.steps[ks[0]])
            slot_of.update((k, ks[0]) for k in ks)
        if grad_scale is not None:  # every rule's gradient factor is its slot 0: unscale there
            scale = grad_scale.reshape(())
            t.c32[:, 0].div_(scale)
            t.c64[:, 0].div_(scale)
        launch = be.launch if stream is None else functools.partial(be.launch, stream=stream)
        stepped = []
        for _gi, _hyper, rule, e, arrays, g, _valid, ps in units:
            kname, args, extra = self._kernel_args(rule, e, arrays, g, arrays[0])
            launch(kname, args, dev.constants(slot_of[self._dev_index[ps[0]]], compute_dtype(e.dtype)), *extra)
            for p in ps:
                self._dev_sig[p] = hash((self._dev_sig[p], self._calls))
            stepped.extend(ps)
        if t.mirror is not None:
            t.mirror.copy_(t.steps)
        if reduce:
            self.last_grad_norm = t.norm[0]
        self.last_step_launches = len(units)
        if stepped:
            increment_version(stepped)

    def _sync_lrs(self, t: Any) -> None:
        """A group's tensor ``lr`` copied into the device's lr (on the device: a schedule that writes the
        tensor in place reaches a replayed graph); a float ``lr`` is passed with the constants."""
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                t.lr[gi : gi + 1].copy_(lr.detach().reshape(1))
                self._dev_lr[gi] = True
            elif self._dev_lr[gi]:
                t.lr[gi : gi + 1].fill_(-1.0)  # the host's lr again
                self._dev_lr[gi] = False

    def _device_steps(self) -> tuple[DeviceSteps, Any]:
        """The device bookkeeping of every param (a slot each), made at the first GPU step and again
        when the params change: counts from the state (a device ``step`` copied on the device), the
        skipped count carried over; each ``state["step"]`` becomes its view of the float32 counts."""
        params = tuple(p for group in self.param_groups for p in group["params"])
        if self._dev is not None and self._dev_params == params:
            return self._dev, self._dev_t
        be, device = self._backend, self._backend_device
        counts = [0] * len(params)
        on_device = []
        mirror = self._dev_t.mirror if self._dev is not None else None
        for k, p in enumerate(params):
            state = self.state.get(p)
            if not state:
                continue
            st = state.get("step")
            if self.keeps_step and isinstance(st, torch.Tensor) and (
                    not st.is_cpu or (mirror is not None and st._base is mirror)):
                on_device.append((k, st))
            else:
                counts[k] = self._next_step(state) - 1
                self._dev_sig[p] = hash(("count", counts[k]))
        old = self._dev
        dev = DeviceSteps(len(self.param_groups), None, be)
        dev.set_slots(counts)
        if old is not None:
            dev.skipped = old.skipped
        t = SimpleNamespace(sums=torch_view(dev.sums, device), steps=torch_view(dev.steps, device),
                            c32=torch_view(dev.consts32, device), c64=torch_view(dev.consts64, device),
                            lr=torch_view(dev.lr, device), norm=torch_view(dev.norm, device), mirror=None)
        for k, st in on_device:
            t.steps[k].copy_(st)
        if self.keeps_step:
            t.mirror = flatten.zeros(len(params), torch.float32, device)
            t.mirror.copy_(t.steps)
            for k, p in enumerate(params):
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = t.mirror[k]
        for p in params:
            self._dev_sig.setdefault(p, hash(("count", 0)))
            entry = flatten.owner(p)
            if entry is not None and entry[0] not in self._dev_valid:
                self._dev_valid[entry[0]] = dev.upload(entry[0].valid)
        self._dev, self._dev_t, self._dev_params = dev, t, params
        self._dev_index = {p: k for k, p in enumerate(params)}
        self._dev_lr = [False] * len(self.param_groups)
        self._views.clear()
        return dev, t

    def _device_views_of(self, p: torch.Tensor, rule: str, hyper: Any) -> Views:
        """A CUDA param's first views, its state made (its count is the device's)."""
        state = self.state[p]
        names = self._names(rule, p)
        self._init_state(p, state, hyper, names)
        e = self._views[p] = Views(p, state, names, 0, self._backend, self._flat_state)
        return e
