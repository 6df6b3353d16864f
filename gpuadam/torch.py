"""``gpuadam.torch``: drop-in ``torch.optim`` optimizers on gpuadam's fused kernels (CPU tensors).

``from gpuadam.torch import AdamW`` in place of ``from torch.optim import AdamW``: the classes are
``torch.optim.Optimizer`` subclasses with torch's signatures and defaults (plus our keyword-only
extras: ``eps_root``, ``bias_correction``, ``ema_momentum`` where they apply, and ``backend``), so
``param_groups``, ``zero_grad``, ``add_param_group``, step hooks, ``lr_scheduler`` and
``state_dict``/``load_state_dict`` are torch's own. ``opt.state[p]`` is in torch's layout (``step``
a 0-d tensor, ``exp_avg``, ``exp_avg_sq``... the rule's torch names), and those tensors ARE the
buffers the kernel updates (NumPy views, no copy): a torch checkpoint loads here and ours loads
into torch.

Each step launches the rule's Numba CPU loop per param that has a gradient, with the constants of
``gpuadam.hyper`` (validated from the group's values); the rule and the state names come from
``kernels.rules.RULES`` through the matching ``gpuadam`` optimizer class. Every param and gradient
is checked before the first launch, so a refused step changes nothing. ``torch.amp.GradScaler``
sees ``_step_supports_amp_scaling``: the kernel unscales (``grad_mul = 1 / grad_scale``) and a
step with ``found_inf`` changes nothing, step counts included.

Not here yet: CUDA tensors (``capturable`` is refused), ``differentiable=True`` (refused: the
kernel updates outside autograd), sparse or complex gradients, float16/bfloat16 params.
``foreach`` and ``fused`` are accepted and ignored.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

import gpuadam
from gpuadam import backends
from gpuadam.arrays import describe
from gpuadam.kernels.rules import RULES
from gpuadam.kernels.rules.nadam import nadam_log_mu_product

#: ``gpuadam`` options that have no meaning here (half precision, our skipping): not taken.
_NOT_HERE = {"skip_nonfinite", "master_weights", "stochastic_rounding", "seed", "half_format", "capturable",
             "state_dtype"}
#: torch's options without a meaning for our kernels: accepted, kept in the groups, ignored or refused.
_TORCH_ONLY = ("foreach", "capturable", "differentiable", "fused")
_DTYPES = (torch.float32, torch.float64)


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch's ``step`` tensors (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _plain(value: Any) -> Any:
    """A group value as the ``gpuadam.hyper`` records take it: a one-element tensor as its number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _signature(ours: type, theirs: type | None, fixed: dict) -> inspect.Signature:
    """torch's signature of ``theirs`` plus, keyword-only, our options it lacks (``fixed`` ones left out);
    for an optimizer torch.optim lacks, ours with torch's options added."""
    our_params = [p for p in inspect.signature(ours).parameters.values() if p.name not in _NOT_HERE]
    if theirs is not None:
        base = list(inspect.signature(theirs).parameters.values())
    else:
        base = our_params + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                               default=False if n in ("capturable", "differentiable") else None)
                             for n in _TORCH_ONLY]
    names = {p.name for p in base}
    extras = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in our_params
              if p.name not in names and p.name not in fixed]
    return inspect.Signature(base + extras)


def _hyper_keys(hyper_class: type) -> tuple[str, ...]:
    """The constructor keywords of a ``gpuadam.hyper`` record (``betas`` for its two betas)."""
    keys = []
    for f in fields(hyper_class):
        name = "betas" if f.name in ("beta1", "beta2") else f.name
        if name not in keys:
            keys.append(name)
    return tuple(keys)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the drop-in classes: ``ours`` names the ``gpuadam`` optimizer whose hyperparameter
    record, rule choice and state start values are used; ``__signature__`` is torch's (plus ours)."""

    ours: type = gpuadam.Optimizer
    fixed: dict = {}
    #: torch keeps ``step`` in the state of every optimizer but SGD
    keeps_step = True
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        bound = self.__signature__.bind(params, *args, **kwargs)
        bound.apply_defaults()
        defaults = dict(bound.arguments)
        params = defaults.pop("params")
        if defaults.get("differentiable"):
            raise ValueError(f"{name}: differentiable=True is not supported: the fused kernel updates the "
                             "params outside autograd; use torch.optim for a differentiable step")
        if defaults.get("capturable"):
            raise ValueError(f"{name}: capturable=True is for CUDA graphs on GPU tensors; gpuadam.torch steps "
                             "CPU tensors only for now (capturable=False)")
        self._backend = backends.choose(defaults.pop("backend", "auto"), describe(np.zeros(1, np.float32)))
        defaults.update(self.fixed)
        our_defaults = {k: p.default for k, p in inspect.signature(self.ours).parameters.items()}
        self._hyper_defaults = {k: our_defaults[k] for k in _hyper_keys(self.ours.hyper_class)}
        self._hyper_cache: dict = {}
        self._views: dict = {}  # param -> _Views, its NumPy views and step count between steps
        self._hyper(defaults, "defaults")  # refuse bad defaults even when every group overrides them
        super().__init__(params, defaults)

    # --- values ------------------------------------------------------------------------------
    def _hyper(self, group: dict, where: str) -> Any:
        """The group's validated ``gpuadam.hyper`` record (cached by value)."""
        try:
            kw = {k: _plain(group.get(k, default)) for k, default in self._hyper_defaults.items()}
            key = tuple(kw.items())
            hyper = self._hyper_cache.get(key)
            if hyper is None:
                hyper = self._hyper_cache[key] = self.ours.hyper_class.from_kwargs(**kw)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__}: {where}: {exc}") from None
        return hyper

    def _rule(self, hyper: Any) -> str:
        # the gpuadam class's choice of rule reads only the record
        return self.ours.rule(self, hyper)

    # --- state -------------------------------------------------------------------------------
    def _next_step(self, state: dict) -> int:
        return int(state["step"].item()) + 1 if "step" in state else 1

    def _init_state(self, p: torch.Tensor, state: dict, hyper: Any, names: tuple[str, ...]) -> None:
        """torch's state for ``p`` at step 0: ``step`` and the rule's buffers (zero, or the start value)."""
        if self.keeps_step and "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        start = self.ours.state_init(self, hyper)
        for n in names:
            if n not in state:
                state[n] = torch.full_like(p, start.get(n, 0.0), memory_format=torch.contiguous_format)

    def _after_step(self, state: dict, hyper: Any, step: int) -> None:
        state["step"].fill_(step)

    def _adopt_state(self) -> None:
        """After a load: every buffer our own contiguous tensor of its param's dtype and shape (the kernel
        writes through it), ``step`` a 0-d tensor of torch's scalar dtype."""
        self._views = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for n, value in list(state.items()):
                    if n == "step" or (isinstance(value, torch.Tensor) and value.dim() == 0 and p.dim() != 0):
                        state[n] = torch.tensor(float(_plain(value)), dtype=_scalar_dtype())
                    elif isinstance(value, torch.Tensor):
                        state[n] = value.detach().to(p.dtype).reshape(p.shape).clone(
                            memory_format=torch.contiguous_format)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch checkpoint lacks our options: theirs are the defaults
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self._adopt_state()

    # --- the step ----------------------------------------------------------------------------
    def _describe(self, k: int, gi: int, j: int, group: dict) -> str:
        names = group.get("param_names")
        named = f" {names[j]!r}" if names is not None and j < len(names) else ""
        return f"param {k}{named} (group {gi}, index {j})"

    def _check(self, label: str, p: torch.Tensor, g: torch.Tensor) -> None:
        def refuse(why: str) -> None:
            raise ValueError(f"{type(self).__name__}.step: {label}: {why}; nothing was updated")

        if p.device.type != "cpu":
            refuse(f"is on {p.device}; gpuadam.torch steps CPU tensors only for now")
        if p.dtype not in _DTYPES:
            refuse(f"has dtype {p.dtype}; expected torch.float32 or torch.float64")
        if p.layout != torch.strided or not p.is_contiguous():
            refuse("is not a contiguous dense tensor")
        if g.is_sparse or g.layout != torch.strided:
            refuse("has a sparse gradient; the fused kernels take dense ones")
        if g.device.type != "cpu" or g.dtype != p.dtype or g.shape != p.shape:
            refuse(f"its gradient is a {g.dtype} tensor of shape {tuple(g.shape)} on {g.device}; expected "
                   f"{p.dtype}, shape {tuple(p.shape)}, on cpu")
        if not g.is_contiguous():
            refuse("its gradient is not contiguous")

    def _check_state(self, label: str, p: torch.Tensor, state: dict, names: tuple[str, ...]) -> None:
        missing = [n for n in names if n not in state and not self._lazy(n)]
        if missing:
            raise ValueError(f"{type(self).__name__}.step: {label}: the hyperparameters now need state "
                             f"{missing} it does not have (e.g. amsgrad switched on mid-run)")
        for n in names:
            t = state.get(n)
            if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == p.dtype
                                      and t.shape == p.shape and t.is_contiguous()
                                      and t.device.type == "cpu"):
                raise ValueError(f"{type(self).__name__}.step: {label}: state {n!r} is not a contiguous "
                                 f"{p.dtype} CPU tensor of shape {tuple(p.shape)}")

    def _grad_view(self, k: int, gi: int, j: int, group: dict, p: torch.Tensor, g: torch.Tensor,
                   e: _Views) -> np.ndarray:
        """The gradient's flat NumPy view, once checked against the cached param (``_check``'s rules)."""
        if g.requires_grad:
            g = g.detach()
        if (g.dtype is not e.dtype or g.layout is not torch.strided or not g.is_cpu or g.shape != e.shape
                or not g.is_contiguous()):
            self._check(self._describe(k, gi, j, group), p, g)  # raises, naming what is wrong
        view = g.numpy()
        return view if view.ndim == 1 else view.reshape(-1)

    def _plan(self) -> list[tuple]:
        """Check every group, param, gradient and existing state; per group, its launches in order:
        ``(gi, hyper, rule, names, [(p, flat grad, cached views or None), ...])``."""
        work = []
        cache = self._views
        k = -1
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group, f"param group {gi}")
            rule = self._rule(hyper)
            names = _state_names(rule)
            items = []
            for j, p in enumerate(group["params"]):
                k += 1
                g = p.grad
                if g is None:
                    continue
                e = cache.get(p)
                if e is not None and e.valid(p, self.state.get(p), names):
                    items.append((p, self._grad_view(k, gi, j, group, p, g, e), e))
                    continue
                label = self._describe(k, gi, j, group)
                g = g.detach()
                self._check(label, p, g)
                state = self.state.get(p)
                if state:
                    self._check_state(label, p, state, names)
                items.append((p, g.numpy().reshape(-1), None))
            if items:
                work.append((gi, hyper, rule, names, items))
        return work

    def _lazy(self, name: str) -> bool:
        """Whether a missing state buffer is created at its first step (torch's SGD momentum buffer)."""
        return False

    def _forget_views(self) -> None:
        """Drop the cached NumPy views (after a load or a new group: rebuilt, checked, at the next step)."""
        self._views.clear()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._forget_views()

    def step(self, closure: Any = None) -> Any:
        """One fused step of every param with a gradient; returns the closure's loss (run with grad)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._plan()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # GradScaler found inf/NaN: nothing changes, step counts included
        grad_scale = getattr(self, "grad_scale", None)
        grad_mul = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        launch = self._backend.launch
        cache = self._views
        counted = self.keeps_step and type(self)._after_step is FusedOptimizer._after_step
        stepped = []
        for _gi, hyper, rule, names, items in work:
            constants: dict = {}
            for p, g, e in items:
                if e is None:
                    state = self.state[p]
                    step = self._next_step(state)
                    self._init_state(p, state, hyper, names)
                    e = cache[p] = _Views(p, state, names, step - 1)
                else:
                    state = e.state
                    step = e.step + 1 if e.step is not None else self._next_step(state)
                key = (step, e.dtype)
                c = constants.get(key)
                if c is None:
                    c = constants[key] = hyper.constants(
                        step, np.float32 if e.dtype is torch.float32 else np.float64, grad_mul)
                launch(rule, (e.arrays[0], g, *e.arrays[1:]), c)
                if counted and e.step_array is not None:
                    e.step_array.fill(step)  # state["step"].fill_(step) through its NumPy view
                else:
                    self._after_step(state, hyper, step)
                    e.step_version = None if e.step_tensor is None else e.step_tensor._version
                e.step = step if e.step_tensor is not None and step < _EXACT[e.step_tensor.dtype] else None
                stepped.append(p)
        if stepped:
            increment_version(stepped)  # as torch's in-place update: autograd sees the params changed
        return loss


@functools.cache
def _state_names(rule: str) -> tuple[str, ...]:
    """The rule's state buffer names (one tuple per rule: ``RULES[rule].state_names`` builds it anew)."""
    return RULES[rule].state_names


#: The counts a float holds exactly: 2**24 (float32), 2**53 (float64); past them ``step`` is read back.
_EXACT = {torch.float32: 2 ** 24, torch.float64: 2 ** 53}


class _Views:
    """A param's flat NumPy views (param, then its rule's state buffers) and its step count, valid while
    the param's memory, dtype and shape, its state dict, buffer tensors and ``step`` are the ones seen."""

    __slots__ = ("p", "ptr", "shape", "dtype", "state", "names", "buffers", "ptrs", "arrays",
                 "step_tensor", "step_array", "step_version", "step")

    def __init__(self, p: torch.Tensor, state: dict, names: tuple[str, ...], step: int) -> None:
        data = p.detach()
        self.p, self.ptr, self.shape, self.dtype = p, data.data_ptr(), data.shape, data.dtype
        self.state, self.names = state, names
        self.buffers = tuple(state[n] for n in names)
        self.ptrs = tuple(t.data_ptr() for t in self.buffers)
        self.arrays = (data.numpy().reshape(-1), *(t.numpy().reshape(-1) for t in self.buffers))
        st = state.get("step")
        self.step_tensor = st if isinstance(st, torch.Tensor) and st.dim() == 0 else None
        # written through NumPy, which leaves ``_version`` alone: a change by torch still shows
        self.step_array = None if self.step_tensor is None else st.numpy()
        self.step_version = None if self.step_tensor is None else st._version
        # the count, where the tensor holds it exactly (else it is read back at each step)
        self.step = None
        if self.step_tensor is not None and float(st.item()) == step and step < _EXACT[st.dtype]:
            self.step = step

    def valid(self, p: torch.Tensor, state: Any, names: tuple[str, ...]) -> bool:
        if (p.data_ptr() != self.ptr or state is not self.state or names != self.names
                or p.dtype is not self.dtype or p.shape != self.shape or not p.is_contiguous()):
            return False
        for n, t, ptr in zip(names, self.buffers, self.ptrs):
            if state.get(n) is not t or t.data_ptr() != ptr:
                return False
        st = self.step_tensor
        return st is None or (state.get("step") is st and st._version == self.step_version)


class _SGDState(FusedOptimizer):
    """torch's SGD keeps no step count: the first step with momentum is the one without a buffer."""

    keeps_step = False

    def _next_step(self, state: dict) -> int:
        return 2 if "momentum_buffer" in state else 1

    def _after_step(self, state: dict, hyper: Any, step: int) -> None:
        pass

    def _lazy(self, name: str) -> bool:
        return name == "momentum_buffer"


class _NAdamState(FusedOptimizer):
    """torch's NAdam keeps ``mu_product`` (the product of its momentum schedule) as a 0-d tensor; our
    kernel computes it from the step count, and the state carries it for torch."""

    def _init_state(self, p: torch.Tensor, state: dict, hyper: Any, names: tuple[str, ...]) -> None:
        if not state:  # in torch's order: step, mu_product, the buffers
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["mu_product"] = torch.tensor(1.0, dtype=_scalar_dtype())
        super()._init_state(p, state, hyper, names)

    def _after_step(self, state: dict, hyper: Any, step: int) -> None:
        super()._after_step(state, hyper, step)
        product = 0.0
        if hyper.beta1 > 0.0:
            product = math.exp(nadam_log_mu_product(float(step), hyper.beta1, hyper.momentum_decay))
        state["mu_product"].fill_(product)


class _AdagradState(FusedOptimizer):
    """torch's Adagrad makes every param's state at construction (``step`` 0, ``sum`` at its start value)."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group, f"param group {gi}")
            for p in group["params"]:
                self._init_state(p, self.state[p], hyper, RULES[self._rule(hyper)].state_names)


def _make(name: str, base: type = FusedOptimizer, fixed: dict | None = None) -> type:
    ours = getattr(gpuadam, name)
    theirs = getattr(torch.optim, name, None)
    fixed = fixed or {}
    sig = _signature(ours, theirs, fixed)
    where = f"``torch.optim.{name}``" if theirs is not None else f"``gpuadam.{name}``"
    doc = (f"{name} on gpuadam's fused CPU kernels, a drop-in for {where}: the same signature, defaults, "
           f"param groups, state and state_dict. The algorithm and our options: ``gpuadam.{name}``.")
    return type(name, (base,), {"ours": ours, "fixed": fixed, "__signature__": sig, "__doc__": doc,
                                "__module__": __name__, "__qualname__": name})


Adam = _make("Adam")
AdamW = _make("AdamW", fixed={"decoupled_weight_decay": True})
SGD = _make("SGD", _SGDState)
RMSprop = _make("RMSprop")
Adagrad = _make("Adagrad", _AdagradState)
Adamax = _make("Adamax")
NAdam = _make("NAdam", _NAdamState)
RAdam = _make("RAdam")
Lion = _make("Lion")

__all__ = ["SGD", "Adagrad", "Adam", "Adamax", "AdamW", "FusedOptimizer", "Lion", "NAdam", "RAdam", "RMSprop"]
