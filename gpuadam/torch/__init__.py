"""``gpuadam.torch``: drop-in ``torch.optim`` optimizers on gpuadam's fused kernels.

``from gpuadam.torch import AdamW`` in place of ``from torch.optim import AdamW``: the classes are
``torch.optim.Optimizer`` subclasses with torch's signatures and defaults (plus our keyword-only
extras: ``eps_root``, ``bias_correction``, ``ema_momentum``, ``state_dtype`` where they apply, ``max_grad_norm``,
``skip_nonfinite``, ``master_weights``, ``stochastic_rounding``, ``seed`` and ``backend``), so
``param_groups``, ``zero_grad``, ``add_param_group``, step hooks, ``lr_scheduler`` and
``state_dict``/``load_state_dict`` are torch's own. ``opt.state[p]`` is in torch's layout (``step``
a 0-d tensor, ``exp_avg``, ``exp_avg_sq``... the rule's torch names, and ``master`` for a half param
with master weights), and those tensors ARE the buffers the kernel updates (no copy): a torch
checkpoint loads here and ours loads into torch.

Each step launches the rule's kernel per param that has a gradient, or once per buffer of
``flatten_parameters`` (``last_step_launches`` counts them), with the constants of ``gpuadam.hyper``
(validated from the group's values). Every param, gradient and state buffer is checked before the
first launch, so a refused step changes nothing. ``torch.amp.GradScaler`` sees
``_step_supports_amp_scaling``: the kernel unscales (``grad_mul = 1 / grad_scale``) and a step with
``found_inf`` changes nothing, step counts included. ``max_grad_norm`` (a group option) clips by the
norm of every gradient of every group, as ``torch.nn.utils.clip_grad_norm_`` over them all would,
inside the same kernel; ``last_grad_norm`` is that norm.

``state_dtype="int8"``/``"bfloat16"`` (Adam, AdamW, NAdam, RAdam) keeps the moments in ``gpuadam.lean``'s formats
(``gpuadam.torch.lean_state``): ``opt.state[p]`` holds the codes and absmax, or the bfloat16 moments,
that the lean kernels update; ``state_dict()`` records the format and a load of another is refused.

Devices and dtypes: float32, float64, float16 and bfloat16 tensors (the half ones computed in
float32; ``master_weights`` keeps a float32 copy of each half param, ``stochastic_rounding`` rounds
bfloat16 params stochastically, from ``seed``), on the CPU (Numba loops over NumPy views) or on a
CUDA device (``gpuadam.torch.devices``: launched on torch's current stream). A CUDA step never
synchronises: each launch's step count and constants are made on the device
(``gpuadam.torch.device_step``), where GradScaler's ``grad_scale`` and ``found_inf``, ``max_grad_norm``,
``skip_nonfinite`` and a tensor ``lr`` are read; ``state["step"]`` is then a float32 0-d tensor on
the device (torch's layout with ``fused``/``capturable``), ``last_grad_norm`` a device tensor, and
``steps_skipped`` a read of the device's count. ``capturable=True`` is accepted (CUDA params; not
with stochastic rounding): the step can be captured in a CUDA graph, a float ``lr`` captured as it
was, a tensor ``lr`` read at each replay. The CUDA path has run in Numba's CUDA simulator only (on
stand-ins for CUDA tensors); tests/gpu has the GPU checks. Not here: ``differentiable=True``
(refused), sparse or complex gradients. ``foreach`` and ``fused`` are accepted and ignored.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import fields
from typing import Any

import torch
from torch.autograd.graph import increment_version

import gpuadam
from gpuadam import lean
from gpuadam.arrays import HOST
from gpuadam.hyper import check_count, check_flag
from gpuadam.kernels.lowp import BFLOAT16
from gpuadam.kernels.rules import RULES, grad_factor
from gpuadam.kernels.rules.nadam import nadam_log_mu_product
from gpuadam.on_device import DeviceSteps
from gpuadam.optim import padding_stays_zero
from gpuadam.precision import widen_half
from gpuadam.torch import flatten, lean_state
from gpuadam.torch.device_step import DeviceStepping
from gpuadam.torch.devices import FLOATS, HALF, backend_for, compute_dtype, kernel_view, stream_of
from gpuadam.torch.flatten import FlatParams, flatten_parameters
from gpuadam.torch.views import EXACT, Views, viewed

#: ``gpuadam`` options not taken here (torch tensors carry their dtype; capturable is torch's).
_NOT_HERE = {"half_format", "capturable"}
#: torch's options without a meaning for our kernels: accepted, kept in the groups, ignored or refused.
_TORCH_ONLY = ("foreach", "capturable", "differentiable", "fused")


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
    if "max_grad_norm" not in names:  # a step() argument of gpuadam's, a group option here
        extras.append(inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(base + extras)


def _hyper_keys(hyper_class: type) -> tuple[str, ...]:
    """The constructor keywords of a ``gpuadam.hyper`` record (``betas`` for its two betas)."""
    keys = []
    for f in fields(hyper_class):
        name = "betas" if f.name in ("beta1", "beta2") else f.name
        if name not in keys:
            keys.append(name)
    return tuple(keys)


class FusedOptimizer(DeviceStepping, torch.optim.Optimizer):
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
        capturable = check_flag("capturable", bool(defaults.get("capturable")))
        self._requested = defaults.pop("backend", "auto")
        self.skip_nonfinite = check_flag("skip_nonfinite", defaults.pop("skip_nonfinite", False))
        self.master_weights = check_flag("master_weights", defaults.pop("master_weights", False))
        self.stochastic_rounding = check_flag("stochastic_rounding", defaults.pop("stochastic_rounding", False))
        try:
            self.state_format = lean.check_state_dtype(defaults.pop("state_dtype", None))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        seed = defaults.pop("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{name}: seed: expected an integer in [0, 2**32), got {seed!r}")
        self.seed = seed
        if capturable and (self.stochastic_rounding or self.state_format == "bfloat16"):
            raise ValueError(f"{name}: capturable=True with stochastic rounding (stochastic_rounding, or "
                             "state_dtype='bfloat16'): a captured CUDA graph would replay the same random bits "
                             "every step")
        if self.stochastic_rounding and self.master_weights:
            raise ValueError(f"{name}: stochastic_rounding is for bfloat16 params without master weights; "
                             "master_weights=True keeps a float32 copy instead")
        _check_max_norm(defaults.get("max_grad_norm"), f"{name}: max_grad_norm")
        defaults.update(self.fixed)
        our_defaults = {k: p.default for k, p in inspect.signature(self.ours).parameters.items()}
        self._hyper_defaults = {k: our_defaults[k] for k in _hyper_keys(self.ours.hyper_class)}
        self._hyper_cache: dict = {}
        self._views: dict = {}  # param -> Views, its kernel views and step count between steps
        self._flat_state: dict = {}  # FlatParams -> {state name: whole 1-D buffer} of this optimizer
        self._padding_cache: dict = {}
        self._calls = 0  # steps that reached the kernels: the stochastic rounding counter
        self._skipped_host = 0  # skipped steps counted on the host (the device counts its own)
        # the GPU step's bookkeeping on the device (``_device_steps``): made at the first CUDA step
        self._dev: DeviceSteps | None = None
        self._dev_t: Any = None  # torch views of its arrays, and the float32 ``step`` tensors
        self._dev_params: tuple = ()
        self._dev_index: dict = {}  # param -> its slot (its index among all params)
        self._dev_sig: dict = {}  # param -> which steps it took part in (equal: the same count)
        self._dev_lr: list[bool] = []  # per group: lr read from a tensor on the device
        self._dev_valid: dict = {}  # FlatParams -> its padding mask on the device
        self.last_step_launches = 0
        self.last_grad_norm: float | None = None
        self._hyper(defaults, "defaults")  # refuse bad defaults even when every group overrides them
        super().__init__(params, defaults)
        # the backend of the params' device (chosen again by a step if the params have moved)
        self._backend_device = self._device_of()
        self._backend = backend_for(self._backend_device, self._requested)
        if self.state_format is not None:
            for gi, group in enumerate(self.param_groups):
                self._check_lean_rule(gi, self._rule(self._hyper(group, f"param group {gi}")))
            for gi, group in enumerate(self.param_groups):
                for j, p in enumerate(group["params"]):
                    self._check_lean_param(f"param {j} of group {gi}", p)

    # --- values ------------------------------------------------------------------------------
    def _hyper(self, group: dict, where: str) -> Any:
        """The group's validated ``gpuadam.hyper`` record (cached by value)."""
        try:
            on_device = getattr(self, "_backend", None) is not None and self._backend.kind != HOST
            kw = {}
            for k, default in self._hyper_defaults.items():
                value = group.get(k, default)
                if k == "lr" and on_device and isinstance(value, torch.Tensor):
                    value = 0.0  # the GPU step reads the tensor on the device (``_sync_lrs``)
                kw[k] = _plain(value)
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

    def _names(self, rule: str, p: torch.Tensor) -> tuple[str, ...]:
        """The state buffer names of ``p`` (the rule's or its lean format's, then ``master`` for half
        params with master weights)."""
        kind = self._lean_kind(p)
        names = lean.NAMES[kind] if kind else _state_names(rule)
        return (*names, "master") if self.master_weights and p.dtype in HALF else names

    def _lean_kind(self, p: torch.Tensor) -> str | None:
        """The format ``p``'s moments are kept in (``state_dtype``; int8 from ``lean.MIN_SIZE`` elements)."""
        return lean.kind_for(self.state_format, p.numel()) if self.state_format else None

    def _spec(self, p: torch.Tensor, name: str) -> tuple[torch.dtype, tuple]:
        """``(dtype, shape)`` of ``p``'s state buffer ``name``."""
        kind = lean_state.FORMAT_OF.get(name)
        if kind is not None:
            return lean_state.spec(kind, name, tuple(p.shape))
        return self._state_dtype(p), tuple(p.shape)

    def _check_lean_rule(self, gi: int, rule: str) -> None:
        refusal = lean.rule_refusal(self.state_format, rule) if self.state_format is not None else None
        if refusal:
            raise ValueError(f"{type(self).__name__}: param group {gi}: {refusal}; nothing was updated")

    def _check_lean_param(self, label: str, p: torch.Tensor) -> None:
        """Refuse a param that lean state cannot step (as ``gpuadam.Adam(state_dtype=...)`` does)."""
        fmt = self.state_format
        where = f"{type(self).__name__}: {label}: state_dtype={fmt!r}"
        if self._backend.name not in ("numba-cpu", "numba-cuda"):
            raise ValueError(f"{where}: the lean-state kernels run on numba-cpu and numba-cuda so far, got "
                             f"backend {self._backend.name}")
        if p.dtype in HALF and not self.master_weights or p.dtype not in HALF and p.dtype != torch.float32:
            raise ValueError(f"{where} is for float32 params, or half params with master_weights=True, "
                             f"got {p.dtype}")

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.master_weights and p.dtype in HALF else p.dtype

    # --- state -------------------------------------------------------------------------------
    def _next_step(self, state: dict) -> int:
        return int(state["step"].item()) + 1 if "step" in state else 1

    def _buffer(self, p: torch.Tensor, name: str, dtype: torch.dtype, start: float) -> torch.Tensor:
        """A new state buffer for ``p``: its view of this optimizer's whole buffer ``name`` when ``p``
        is flattened (so the buffer's params step in one launch), else a tensor of its own (also with
        lean state, which steps param by param: a whole buffer would hold the lean params' moments too)."""
        entry = flatten.owner(p) if self.state_format is None else None
        if entry is None:
            return torch.full(p.shape, start, dtype=dtype, device=p.device)
        buf, k = entry
        whole = self._flat_state.setdefault(buf, {})
        if name not in whole or whole[name].dtype != dtype:
            # padding at the start value too, as gpuadam's FlatBuffer state: a step keeps it there
            whole[name] = flatten.zeros(buf.size, dtype, buf.device, start)
        return buf.view(whole[name], k)

    def _init_state(self, p: torch.Tensor, state: dict, hyper: Any, names: tuple[str, ...]) -> None:
        """torch's state for ``p`` at step 0: ``step`` and the rule's buffers (zero, or the start value),
        and the float32 ``master`` copy of a half param."""
        if self.keeps_step and "step" not in state:
            state["step"] = self._new_step(p)
        start = self.ours.state_init(self, hyper)
        dtype = self._state_dtype(p)
        kind = lean_state.kind_of(names)
        if kind:
            self._backend.ready(lean.kernel(self._rule(hyper), kind))  # e.g. the int8 maps copied to the GPU, once
        for n in names:
            if n not in state:
                if n in lean_state.FORMAT_OF:  # blocked per tensor: never a view of a flattened buffer
                    state[n] = self._lean_buffer(p, n)
                else:
                    state[n] = self._buffer(p, n, dtype, start.get(n, 0.0))
                if n == "master":
                    _widen_into(state[n], p)

    def _lean_buffer(self, p: torch.Tensor, name: str) -> torch.Tensor:
        dtype, shape = self._spec(p, name)
        return flatten.zeros(math.prod(shape), dtype, p.device).view(shape)

    def _new_step(self, p: torch.Tensor) -> torch.Tensor:
        """A new param's ``step`` (0): on a GPU, its view of the float32 copy of the device's counts
        (torch's layout with ``fused``/``capturable``), else a 0-d tensor on the CPU."""
        k = self._dev_index.get(p) if self._dev is not None else None
        if k is not None and self._dev_t.mirror is not None:
            return self._dev_t.mirror[k]
        return torch.tensor(0.0, dtype=_scalar_dtype())

    def _after_step(self, state: dict, hyper: Any, step: int) -> None:
        state["step"].fill_(step)

    def _adopt_state(self) -> None:
        """After a load: every buffer our own contiguous tensor of its param's state dtype and shape (a
        view of the whole buffer for a flattened param), ``step`` a 0-d tensor of torch's scalar dtype;
        a half param's ``master`` made from it when the checkpoint has none (torch's)."""
        self._views = {}
        self._flat_state = {}
        self._dev = None  # the device's counts are the loaded ones now (made again at the next GPU step)
        raw = getattr(self, "_loading", None) or {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                dtype = self._state_dtype(p)
                saved = raw.get(p, {})
                for n, value in list(state.items()):
                    if n == "step" or (isinstance(value, torch.Tensor) and value.dim() == 0 and p.dim() != 0):
                        state[n] = torch.tensor(float(_plain(value)), dtype=_scalar_dtype())
                    elif isinstance(value, torch.Tensor):
                        # the saved tensor, not torch's cast of it to the param's dtype (a float32 master
                        # of a bfloat16 param, uint8 codes)
                        value = saved.get(n, value)
                        if n in lean_state.FORMAT_OF:
                            buf = self._lean_buffer(p, n)
                            buf.copy_(value.detach().reshape(buf.shape))
                        else:
                            buf = self._buffer(p, n, dtype, 0.0)
                            buf.copy_(value.detach().reshape(p.shape))
                        state[n] = buf
                if self.master_weights and p.dtype in HALF and "master" not in state:
                    state["master"] = self._buffer(p, "master", torch.float32, 0.0)
                    _widen_into(state["master"], p)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch checkpoint lacks our options: theirs are the defaults
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self._adopt_state()

    def state_dict(self) -> dict:
        """torch's state dict, plus ``"gpuadam"``: the stochastic rounding counter and the skipped steps
        (torch.optim ignores the key, so the dict still loads there)."""
        sd = super().state_dict()
        sd["gpuadam"] = {"rounding_counter": self._calls, "steps_skipped": self.steps_skipped,
                         "state_dtype": self.state_format}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load (the state cast to each param's device), then every buffer our own; a state of
        another ``state_dtype`` is refused before anything changes."""
        extra = state_dict.get("gpuadam", {}) if isinstance(state_dict, dict) else {}
        calls = check_count("rounding_counter", extra.get("rounding_counter", 0))
        skipped = check_count("steps_skipped", extra.get("steps_skipped", 0))
        raw = self._saved_by_param(state_dict)
        try:
            self._loading = raw
            super().load_state_dict(state_dict)
        finally:
            self._loading = None
        self._calls, self._skipped_host = calls, skipped

    @property
    def state_nbytes(self) -> int:
        """Bytes of every state buffer (moments, codes and absmax, masters; a flattened buffer's whole
        allocation, padding included, once), as ``gpuadam.Optimizer.state_nbytes``: no step counts."""
        seen = set()
        total = 0
        for state in self.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
        return total

    @property
    def steps_skipped(self) -> int:
        """Steps that changed nothing because a gradient was inf/NaN (``skip_nonfinite``, or GradScaler's
        ``found_inf``). On a GPU the device counts them: reading this synchronises."""
        return self._skipped_host + (self._dev.read_skipped() if self._dev is not None else 0)

    def _saved_by_param(self, state_dict: dict) -> dict:
        """Each param's saved state as saved (torch's load casts floating tensors to the param's dtype),
        after checking its lean format and layout against this optimizer's."""
        name = type(self).__name__
        try:
            saved = lean_state.saved_format(state_dict)
        except ValueError as exc:
            raise ValueError(f"{name}.load_state_dict: {exc}") from None
        if saved != self.state_format:
            raise ValueError(f"{name}.load_state_dict: the state was saved with state_dtype={saved!r}, this "
                             f"optimizer keeps state_dtype={self.state_format!r} (it cannot change mid-run); "
                             "nothing was loaded")
        states = state_dict.get("state") if isinstance(state_dict, dict) else None
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(states, dict) or not isinstance(groups, list):
            return {}  # torch's load says what is wrong
        ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", ())]
        params = [p for g in self.param_groups for p in g["params"]]
        raw = {}
        for i, p in zip(ids, params):
            state = states.get(i)
            if not isinstance(state, dict):
                continue
            raw[p] = {n: v for n, v in state.items() if isinstance(v, torch.Tensor)}
            kind = self._lean_kind(p)
            want = set(lean.NAMES[kind]) if kind else set()
            have = {n for n in state if n in lean_state.FORMAT_OF}
            if have != want:
                raise ValueError(f"{name}.load_state_dict: param {i}: saved lean state {sorted(have)}, expected "
                                 f"{sorted(want)} for its {p.numel()} elements with state_dtype="
                                 f"{self.state_format!r}; nothing was loaded")
            for n in want:
                dtype, shape = self._spec(p, n)
                v = state[n]
                if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.numel() != math.prod(shape):
                    got = f"a {v.dtype} tensor of {v.numel()} elements" if isinstance(v, torch.Tensor) else repr(v)
                    raise ValueError(f"{name}.load_state_dict: param {i}: state {n!r}: expected a {dtype} tensor "
                                     f"of {math.prod(shape)} elements, got {got}; nothing was loaded")
                refusal = lean.absmax_refusal(n, int((v < 0).sum()) if v.dtype.is_floating_point else 0)
                if refusal:
                    raise ValueError(f"{name}.load_state_dict: param {i}: {refusal}; nothing was loaded")
        return raw

    # --- the step ----------------------------------------------------------------------------
    def _describe(self, k: int, gi: int, j: int, group: dict) -> str:
        names = group.get("param_names")
        named = f" {names[j]!r}" if names is not None and j < len(names) else ""
        return f"param {k}{named} (group {gi}, index {j})"

    def _check(self, label: str, p: torch.Tensor, g: torch.Tensor) -> None:
        def refuse(why: str) -> None:
            raise ValueError(f"{type(self).__name__}.step: {label}: {why}; nothing was updated")

        if p.dtype not in FLOATS:
            refuse(f"has dtype {p.dtype}; expected torch.float32, float64, float16 or bfloat16")
        if p.device.type not in ("cpu", "cuda"):
            refuse(f"is on {p.device}; gpuadam.torch steps cpu and cuda tensors")
        if p.layout != torch.strided or not p.is_contiguous():
            refuse("is not a contiguous dense tensor")
        if g.is_sparse or g.layout != torch.strided:
            refuse("has a sparse gradient; the fused kernels take dense ones")
        if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
            refuse(f"its gradient is a {g.dtype} tensor of shape {tuple(g.shape)} on {g.device}; expected "
                   f"{p.dtype}, shape {tuple(p.shape)}, on {p.device}")
        if not g.is_contiguous():
            refuse("its gradient is not contiguous")

    def _check_state(self, label: str, p: torch.Tensor, state: dict, names: tuple[str, ...]) -> None:
        missing = [n for n in names if n not in state and not self._lazy(n)]
        if missing:
            raise ValueError(f"{type(self).__name__}.step: {label}: the hyperparameters now need state "
                             f"{missing} it does not have (e.g. amsgrad switched on mid-run)")
        for n in names:
            t = state.get(n)
            dtype, shape = self._spec(p, n)
            if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == dtype
                                      and tuple(t.shape) == shape and t.is_contiguous() and t.device == p.device):
                raise ValueError(f"{type(self).__name__}.step: {label}: state {n!r} is not a contiguous "
                                 f"{dtype} tensor of shape {shape} on {p.device}")

    def _grad_view(self, k: int, gi: int, j: int, group: dict, p: torch.Tensor, g: torch.Tensor,
                   e: Views) -> Any:
        """The gradient's flat kernel view, once checked against the cached param (``_check``'s rules);
        for a flattened param's gradient view, the checked tensor (its buffer is launched whole)."""
        if g.requires_grad:
            g = g.detach()
        if (g.dtype is not e.dtype or g.layout is not torch.strided or g.is_cpu is not e.cpu
                or (not e.cpu and g.device != e.device) or g.shape != e.shape or not g.is_contiguous()):
            self._check(self._describe(k, gi, j, group), p, g)  # raises, naming what is wrong
        if e.grad_ptr is not None and g.data_ptr() == e.grad_ptr:
            return g
        if e.cpu_float:
            view = g.numpy()
            return view if view.ndim == 1 else view.reshape(-1)
        return kernel_view(g, self._backend)

    def _device_of(self) -> torch.device | None:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return None

    def _plan(self) -> list[tuple]:
        """Check every group, param, gradient and existing state; per group, its params to step
        ``(gi, hyper, rule, [(p, flat grad, cached views or None, flat entry or None), ...])``."""
        device = self._device_of()
        if self._backend_device != device:
            self._backend = backend_for(device, self._requested)
            self._backend_device = device
            self._views.clear()
            if self._dev is not None:  # the counts move with the params: from their step tensors
                self._skipped_host = self.steps_skipped
                self._dev = None
        work = []
        cache = self._views
        k = -1
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group, f"param group {gi}")
            _check_max_norm(group.get("max_grad_norm"), f"{type(self).__name__}: param group {gi}: max_grad_norm")
            rule = self._rule(hyper)
            self._check_lean_rule(gi, rule)
            plain = _state_names(rule)
            items = []
            for j, p in enumerate(group["params"]):
                k += 1
                g = p.grad
                if g is None:
                    continue
                names = self._names(rule, p) if self.master_weights or self.state_format else plain
                e = cache.get(p)
                if e is not None and e.valid(p, self.state.get(p), names, device):
                    view = self._grad_view(k, gi, j, group, p, g, e)
                    items.append((p, view, e, e.entry if isinstance(view, torch.Tensor) else None))
                    continue
                label = self._describe(k, gi, j, group)
                if p.device != device:
                    raise ValueError(f"{type(self).__name__}.step: {label}: is on {p.device}, the other params on "
                                     f"{device}: one optimizer steps the params of one device; nothing was updated")
                g = g.detach()
                self._check(label, p, g)
                if self.state_format is not None:
                    self._check_lean_param(label, p)
                state = self.state.get(p)
                if state:
                    self._check_state(label, p, state, names)
                items.append((p, kernel_view(g, self._backend), None, _flat_entry(p, g)))
            if items:
                work.append((gi, hyper, rule, items))
        return work

    def _lazy(self, name: str) -> bool:
        """Whether a missing state buffer is created at its first step (torch's SGD momentum buffer)."""
        return False

    def _forget_views(self) -> None:
        """Drop the cached kernel views (after a load or a new group: rebuilt, checked, at the next step)."""
        self._views.clear()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._forget_views()

    def _runs(self, items: list, steps: list[int], hyper: Any, rule: str) -> list[tuple[int, int, Any]]:
        """``items`` cut into launches ``(start, stop, whole)``: a whole flattened buffer's params, in
        order, with their gradients, state views and one step count, as one launch over the whole
        buffers (``whole``: its arrays); any other param alone (``whole`` None)."""
        runs = []
        i, n = 0, len(items)
        while i < n:
            entry = items[i][3]
            if entry is not None and entry[1] == 0:
                buf = entry[0]
                stop = i + len(buf)
                whole = self._flat_state.get(buf)
                if (stop <= n and whole is not None
                        and all(items[i + k][3] == (buf, k) and items[i + k][2].flat is whole
                                and steps[i + k] == steps[i] for k in range(len(buf)))
                        and self._keeps_padding(hyper, rule)):
                    runs.append((i, stop, buf))
                    i = stop
                    continue
            runs.append((i, i + 1, None))
            i += 1
        return runs

    def _keeps_padding(self, hyper: Any, rule: str) -> bool:
        kept = self._padding_cache.get(hyper)
        if kept is None:
            kept = self._padding_cache[hyper] = padding_stays_zero(
                rule, self.ours.state_init(self, hyper), _state_names(rule), hyper)
        return kept

    def _grad_sums(self, work: list, inv_scale: float) -> tuple[float, float]:
        """Sum of squares and count of inf/NaN of every gradient to step, times ``inv_scale`` (host)."""
        be = self._backend
        sumsq = bad = 0.0
        for _gi, _hyper, _rule, items in work:
            i = 0
            while i < len(items):
                p, g, _e, entry = items[i]
                if entry is not None and entry[1] == 0 and _whole_grads(items, i, entry[0]):
                    buf = entry[0]
                    s, b = be.grad_sumsq(kernel_view(buf.grad, be), HALF.get(buf.dtype), inv_scale, buf.valid)
                    i += len(buf)
                else:
                    s, b = be.grad_sumsq(viewed(g, be), HALF.get(p.dtype), inv_scale)
                    i += 1
                sumsq += s
                bad += b
        return sumsq, bad

    # torch.compile does not trace the step (NumPy views, Numba dispatchers, CUDA launches): a compiled
    # training step breaks its graph here, runs this step eagerly and resumes compiled code after it
    @torch.compiler.disable
    def step(self, closure: Any = None) -> Any:
        """One fused step of every param with a gradient; returns the closure's loss (run with grad)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._plan()
        if self._backend.kind != HOST:
            self._step_device(work, {gi: _plain(self.param_groups[gi].get("max_grad_norm")) or 0.0
                                     for gi, *_ in work})
            return loss
        if any(group.get("capturable") for group in self.param_groups):
            raise ValueError(f"{type(self).__name__}.step: capturable=True keeps the step counts on the GPU: "
                             f"it takes CUDA params, got params on {self._backend_device}; nothing was updated")
        found_inf = getattr(self, "found_inf", None)
        self._calls += 1  # every step that reached here draws new random bits, skipped or not (as on a GPU)
        if found_inf is not None and float(found_inf) != 0.0:
            self._skipped_host += 1
            self.last_step_launches = 0
            return loss  # GradScaler found inf/NaN: nothing changes, step counts included
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        max_norms = [_plain(self.param_groups[gi].get("max_grad_norm")) or 0.0 for gi, *_ in work]
        reduce = self.skip_nonfinite or any(max_norms)
        sumsq = bad = 0.0
        if reduce:
            sumsq, bad = self._grad_sums(work, inv_scale)
            self.last_grad_norm = math.sqrt(sumsq)
            if self.skip_nonfinite and bad:
                self._skipped_host += 1
                self.last_step_launches = 0
                return loss
        launch = self._backend.launch
        stream = stream_of(self._backend_device)
        if stream is not None:
            launch = functools.partial(launch, stream=stream)
        counted = self.keeps_step and type(self)._after_step is FusedOptimizer._after_step
        stepped: list = []
        launches = 0
        for (_gi, hyper, rule, items), max_norm in zip(work, max_norms):
            grad_mul = grad_factor(sumsq, bad, inv_scale, max_norm, 0.0)[1] if max_norm else inv_scale
            if any(item[3] is not None for item in items):
                launches += self._step_runs(items, hyper, rule, grad_mul, launch, counted, stepped)
            else:
                launches += self._step_each(items, hyper, rule, grad_mul, launch, counted, stepped)
        self.last_step_launches = launches
        if stepped:
            increment_version(stepped)  # as torch's in-place update: autograd sees the params changed
        return loss

    def _views_of(self, p: torch.Tensor, rule: str, hyper: Any) -> tuple[Views, int]:
        """A param's first views: its state made (torch's layout), its step count before this step."""
        state = self.state[p]
        step = self._next_step(state)  # before the state is made: SGD counts its buffer
        names = self._names(rule, p)
        self._init_state(p, state, hyper, names)
        e = self._views[p] = Views(p, state, names, step - 1, self._backend, self._flat_state)
        return e, step

    def _counted(self, e: Views, hyper: Any, step: int, counted: bool) -> None:
        """Record ``step`` as ``e``'s param's count (torch's ``state["step"]``)."""
        if counted and e.step_array is not None:
            e.step_array.fill(step)  # state["step"].fill_(step) through its NumPy view
        else:
            self._after_step(e.state, hyper, step)
            e.step_version = None if e.step_tensor is None else e.step_tensor._version
        e.step = step if e.step_tensor is not None and step < EXACT[e.step_tensor.dtype] else None

    def _step_each(self, items: list, hyper: Any, rule: str, grad_mul: float, launch: Any, counted: bool,
                   stepped: list) -> int:
        """One launch per param (none of the group's params is flattened)."""
        constants: dict = {}
        for p, g, e, _entry in items:
            if e is None:
                e, step = self._views_of(p, rule, hyper)
            else:
                step = e.step + 1 if e.step is not None else self._next_step(e.state)
            key = (step, e.dtype)
            c = constants.get(key)
            if c is None:
                c = constants[key] = hyper.constants(step, compute_dtype(e.dtype), grad_mul)
            if e.fmt is None and e.lean is None:
                launch(rule, (e.arrays[0], g, *e.state_arrays), c)
            else:
                kname, args, extra = self._kernel_args(rule, e, e.arrays, g, e.arrays[0])
                launch(kname, args, c, *extra)
            self._counted(e, hyper, step, counted)
            stepped.append(p)
        return len(items)

    def _step_runs(self, items: list, hyper: Any, rule: str, grad_mul: float, launch: Any, counted: bool,
                   stepped: list) -> int:
        """One launch per whole flattened buffer (``_runs``), one per other param."""
        constants: dict = {}
        steps = []
        for n, (p, g, e, entry) in enumerate(items):
            if e is None:
                e, step = self._views_of(p, rule, hyper)
                items[n] = (p, g, e, entry)
            else:
                step = e.step + 1 if e.step is not None else self._next_step(e.state)
            steps.append(step)
        runs = self._runs(items, steps, hyper, rule)
        for start, stop, buf in runs:
            e = items[start][2]
            step = steps[start]
            key = (step, e.dtype)
            c = constants.get(key)
            if c is None:
                c = constants[key] = hyper.constants(step, compute_dtype(e.dtype), grad_mul)
            if buf is None:
                arrays, g = e.arrays, viewed(items[start][1], self._backend)
            else:
                arrays, g = e.flat_arrays, e.flat_grad
            kname, args, extra = self._kernel_args(rule, e, arrays, g, arrays[0])
            launch(kname, args, c, *extra)
            for n in range(start, stop):
                self._counted(items[n][2], hyper, steps[n], counted)
                stepped.append(items[n][0])
        return len(runs)

    def _kernel_args(self, rule: str, e: Views, arrays: tuple, g: Any, half_param: Any) -> tuple:
        """The kernel name, its arrays and its extra arguments (bfloat16 moments: their rounding; half
        formats: the param's rounding and the half param)."""
        # bfloat16 moments round stochastically, from (1, seed, counter), as gpuadam.Adam's
        extra = ((1, self.seed, self._calls),) if e.lean == "bfloat16" else ()
        lean_kernel = lean.kernel(rule, e.lean) if e.lean else None
        if e.fmt is None:
            return lean_kernel or rule, (arrays[0], g, *arrays[1:]), extra
        # (format, stochastic, seed, counter, index of the array's first element: 0, not sharded)
        rounding = (e.fmt, int(self.stochastic_rounding and e.fmt == BFLOAT16), self.seed, self._calls, 0)
        kname = lean_kernel or f"{rule}/half"
        if e.master:  # the kernel steps the float32 master (the last state buffer) and writes the half param
            return kname, (arrays[-1], g, *arrays[1:-1]), (*extra, rounding, half_param)
        return kname, (arrays[0], g, *arrays[1:]), (*extra, rounding, half_param)


def _check_max_norm(value: Any, where: str) -> None:
    value = _plain(value)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{where}: expected None or a finite number > 0, got {value!r}")


def _flat_entry(p: torch.Tensor, g: torch.Tensor) -> tuple | None:
    """``(FlatParams, index)`` when ``p`` lives in a flattened buffer and ``g`` is its gradient view."""
    entry = flatten.owner(p)
    if entry is None or not flatten.is_grad_view(entry[0], entry[1], g):
        return None
    return entry


def _whole_grads(items: list, i: int, buf: Any) -> bool:
    return i + len(buf) <= len(items) and all(items[i + k][3] == (buf, k) for k in range(len(buf)))


def _widen_into(master: torch.Tensor, p: torch.Tensor) -> None:
    """Write half param ``p``'s float32 values into ``master`` exactly as the kernels widen them
    (``widen_half``; on a GPU torch's conversion, exact as well, in place on the device: no copy to
    the host, no temporary)."""
    if not p.is_cpu:
        master.copy_(p.detach())
        return
    bits = kernel_view(p.detach(), None)
    master.copy_(torch.from_numpy(widen_half(bits, HALF[p.dtype]).reshape(p.shape)))


@functools.cache
def _state_names(rule: str) -> tuple[str, ...]:
    """The rule's state buffer names (one tuple per rule: ``RULES[rule].state_names`` builds it anew)."""
    return RULES[rule].state_names


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
            state["step"] = self._new_step(p)
            state["mu_product"] = torch.tensor(1.0, dtype=_scalar_dtype())
        super()._init_state(p, state, hyper, names)

    def _after_step(self, state: dict, hyper: Any, step: int) -> None:
        super()._after_step(state, hyper, step)
        self._set_mu_product(state, hyper, step)

    @staticmethod
    def _set_mu_product(state: dict, hyper: Any, step: int) -> None:
        product = 0.0
        if hyper.beta1 > 0.0:
            product = math.exp(nadam_log_mu_product(float(step), hyper.beta1, hyper.momentum_decay))
        state["mu_product"].fill_(product)

    def state_dict(self) -> dict:
        if self._dev is not None:  # a GPU step counts on the device: mu_product from the counts (a read)
            for gi, group in enumerate(self.param_groups):
                hyper = self._hyper(group, f"param group {gi}")
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "mu_product" in state:
                        self._set_mu_product(state, hyper, int(state["step"].item()))
        return super().state_dict()


class _AdagradState(FusedOptimizer):
    """torch's Adagrad makes every param's state at construction (``step`` 0, ``sum`` at its start value)."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group, f"param group {gi}")
            rule = self._rule(hyper)
            for p in group["params"]:
                self._init_state(p, self.state[p], hyper, self._names(rule, p))


def _make(name: str, base: type = FusedOptimizer, fixed: dict | None = None) -> type:
    ours = getattr(gpuadam, name)
    theirs = getattr(torch.optim, name, None)
    fixed = fixed or {}
    sig = _signature(ours, theirs, fixed)
    where = f"``torch.optim.{name}``" if theirs is not None else f"``gpuadam.{name}``"
    doc = (f"{name} on gpuadam's fused kernels, a drop-in for {where}: the same signature, defaults, "
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

__all__ = ["SGD", "Adagrad", "Adam", "Adamax", "AdamW", "FlatParams", "FusedOptimizer", "Lion", "NAdam", "RAdam",
           "RMSprop", "flatten_parameters"]
