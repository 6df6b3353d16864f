"""Optimizer classes: parameter groups, state, step counts, ``step()`` and ``state_dict()``.

The shared machinery lives in ``Optimizer``; an optimizer class only names its hyperparameter
record, its state arrays and the kernel rule to launch. ``step()`` validates every gradient and
every group's hyperparameters before the first kernel runs, so a refused step changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gpuadam import backends, flat
from gpuadam.arrays import ArrayInfo, check_grad_count, check_like, check_param, describe
from gpuadam.flat import FlatBuffer
from gpuadam.hyper import AdamHyper, check_positive


class Optimizer:
    """Base class: subclasses set ``hyper_class`` and implement ``state_names`` and ``rule``."""

    hyper_class: type = AdamHyper

    def __init__(self, params: Any, defaults: dict[str, Any], backend: str = "auto") -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = [self._make_group(g) for g in _groups(params)]
        self._params = [p for group in self.param_groups for p in group["params"]]
        if not self._params:
            raise ValueError("params: expected at least one array, got an empty list")
        infos = [check_param(i, p) for i, p in enumerate(self._params)]
        for i, info in enumerate(infos):
            if info.kind != infos[0].kind:
                raise ValueError(
                    f"param {i}: expected a {infos[0].kind} array like param 0, got a {info.kind} array"
                )
        self._infos: list[ArrayInfo] = infos
        self._hyper_cache: dict[int, tuple] = {}
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        self._backend = backends.choose(backend, infos[0])
        be = self._backend
        self._flat = [be.flat(p) for p in self._params]
        # state[i]: name -> 1-D state array of param i, allocated here, never in step(). A group whose
        # params are the views of one FlatBuffer gets its state as one allocation per name, and
        # state[i] are views into it: the group then steps with one launch.
        self.state: list[dict[str, Any]] = []
        self._flat_groups: dict[int, tuple[FlatBuffer, dict[str, Any]]] = {}
        for gi, (group, hyper) in enumerate(zip(self.param_groups, hypers)):
            names = self.state_names(hyper)
            buf = flat.owner(group["params"])
            if buf is None:
                self.state.extend({n: be.zeros_like(p) for n in names} for p in group["params"])
                continue
            whole = {n: be.zeros_like(buf.data) for n in names}
            self._flat_groups[gi] = (buf, whole)
            for offset, p in zip(buf.offsets, group["params"]):
                size = int(np.prod(_shape_of(p)))
                self.state.append({n: a[offset : offset + size] for n, a in whole.items()})
        self.steps = [0] * len(self._params)
        self.last_step_launches = 0

    # --- what a subclass defines -------------------------------------------------------------
    def state_names(self, hyper: Any) -> tuple[str, ...]:
        raise NotImplementedError

    def rule(self, hyper: Any) -> str:
        raise NotImplementedError

    # --- public ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend in use: ``"numba-cuda"``, ``"cupy"`` or ``"numba-cpu"``."""
        return self._backend.name

    def step(self, grads: Sequence[Any], *, grad_scale: float | None = None) -> None:
        """Update every parameter and its state in place from ``grads`` (aligned with the params).

        ``grad_scale``: the gradients are ``grad_scale`` times the true ones (loss scaling); the kernel
        multiplies them by ``1 / grad_scale`` (exact for the powers of two loss scalers use) and leaves
        the arrays in memory as they are.
        """
        check_grad_count(len(self._infos), grads)
        inv_scale = 1.0 if grad_scale is None else 1.0 / check_positive("grad_scale", grad_scale)
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        be = self._backend
        launches = []  # (rule, arrays, hyper, step, dtype, param indices): all checked before any runs
        start = 0
        for gi, (hyper, group) in enumerate(zip(hypers, self.param_groups)):
            names = self.state_names(hyper)
            rule = self.rule(hyper)
            indices = range(start, start + len(group["params"]))
            start += len(indices)
            for i in indices:
                missing = [n for n in names if n not in self.state[i]]
                if missing:
                    raise ValueError(
                        f"param {i}: the hyperparameters now need state {missing} that was not "
                        "allocated at construction (e.g. amsgrad switched on mid-run)"
                    )
            group_grads = grads[indices.start : indices.stop]
            fused = self._flat_groups.get(gi)
            gbuf = flat.owner(group_grads) if fused else None
            steps = {self.steps[i] for i in indices}
            if fused and gbuf is not None and fused[0].same_layout(gbuf) and len(steps) == 1:
                buf, whole = fused
                arrays = (be.flat(buf.data), be.flat(gbuf.data), *(whole[n] for n in names))
                launches.append((rule, arrays, hyper, steps.pop() + 1, buf.dtype, indices))
                continue
            for i in indices:
                check_like("grad", i, grads[i], self._infos[i], writeable=False)
            for i in indices:
                arrays = (self._flat[i], be.flat(grads[i]), *(self.state[i][n] for n in names))
                launches.append((rule, arrays, hyper, self.steps[i] + 1, self._infos[i].dtype, range(i, i + 1)))
        constants: dict[tuple, tuple] = {}
        for rule, arrays, hyper, step, dtype, indices in launches:
            key = (id(hyper), step, dtype)
            c = constants.get(key)
            if c is None:
                c = constants[key] = hyper.constants(step, dtype, inv_scale)
            be.launch(rule, arrays, c)
            for i in indices:
                self.steps[i] = step
        self.last_step_launches = len(launches)

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the state: ``{"optimizer", "state": {i: {...}}, "param_groups": [...]}``."""
        be = self._backend
        state = {
            i: {"step": self.steps[i], **{n: be.to_host(a).reshape(self._infos[i].shape) for n, a in s.items()}}
            for i, s in enumerate(self.state)
        }
        groups = []
        start = 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + count))})
            start += count
        return {"optimizer": type(self).__name__, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; a dict that does not fit the params is refused, changing nothing."""
        kind = state_dict.get("optimizer") if isinstance(state_dict, dict) else None
        if kind != type(self).__name__:
            raise ValueError(f"state_dict: expected one saved by {type(self).__name__}, got {kind!r}")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            got = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"state_dict: expected {len(self.param_groups)} param groups, got {got}")
        new_groups = []
        start = 0
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            count = len(group["params"])
            if list(saved.get("params", [])) != list(range(start, start + count)):
                raise ValueError(
                    f"state_dict: param group {gi} expected params {list(range(start, start + count))}, "
                    f"got {saved.get('params')}"
                )
            start += count
            new = {**{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
            new_groups.append((new, self._hyper(new, gi)))
        state = state_dict.get("state")
        if not isinstance(state, dict) or len(state) != len(self._params):
            got = len(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state_dict: expected state for {len(self._params)} params, got {got}")
        loaded = []
        index = 0
        for (_, hyper), group in zip(new_groups, self.param_groups):
            names = self.state_names(hyper)
            for _ in group["params"]:
                loaded.append(self._check_saved_state(index, state.get(index), names))
                index += 1
        be = self._backend
        for i, (step, arrays) in enumerate(loaded):
            for name, value in arrays.items():
                be.copy_from_host(self.state[i][name], value)
            self.steps[i] = step
        for group, (new, _) in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new)

    # --- machinery ---------------------------------------------------------------------------
    def _make_group(self, group: dict[str, Any]) -> dict[str, Any]:
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"param group: unknown hyperparameters {sorted(unknown)}")
        params = group["params"]
        if describe(params) is not None:
            params = [params]
        else:
            params = list(params)
        return {**self.defaults, **group, "params": params}

    def _hyper(self, group: dict[str, Any], index: int) -> Any:
        # Validation costs microseconds: redo it only when the group's values changed.
        try:
            key = tuple((k, group.get(k)) for k in self.defaults) + (len(group),)
            cached = self._hyper_cache.get(index)
            if cached is not None and cached[0] == key:
                return cached[1]
        except TypeError:  # an unhashable or uncomparable value: validate it anyway
            key = None
        hyper = self._validated_hyper(group, index)
        if key is not None:
            self._hyper_cache[index] = (key, hyper)
        return hyper

    def _validated_hyper(self, group: dict[str, Any], index: int) -> Any:
        missing = [k for k in self.defaults if k not in group]
        unknown = [k for k in group if k not in self.defaults and k != "params"]
        if missing or unknown:
            raise ValueError(f"param group {index}: missing hyperparameters {missing}, unknown {unknown}")
        kwargs = {k: group[k] for k in self.defaults}
        try:
            return self.hyper_class.from_kwargs(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None

    def _check_saved_state(self, i: int, saved: Any, names: tuple[str, ...]) -> tuple[int, dict]:
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict: param {i}: expected a dict of state arrays, got {type(saved).__name__}")
        step = saved.get("step")
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state_dict: param {i}: expected an integer step >= 0, got {step!r}")
        got = set(saved) - {"step"}
        if got != set(names):
            raise ValueError(f"state_dict: param {i}: expected state {sorted(names)}, got {sorted(got)}")
        info = self._infos[i]
        arrays = {}
        for name in names:
            value = saved[name]
            if not isinstance(value, np.ndarray) or value.shape != info.shape or value.dtype != info.dtype:
                got = (value.shape, value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(
                    f"state_dict: param {i}: {name} expected an array of shape {info.shape} and dtype "
                    f"{info.dtype}, got {got}"
                )
            arrays[name] = value
        return int(step), arrays


def _shape_of(x: Any) -> tuple:
    return describe(x).shape


def _groups(params: Any) -> list[dict[str, Any]]:
    if describe(params) is not None:
        raise TypeError("params: expected an iterable of arrays or of dicts, got a single array")
    if not isinstance(params, Iterable):
        raise TypeError(f"params: expected an iterable of arrays or of dicts, got {type(params).__name__}")
    params = list(params)
    if params and all(isinstance(p, dict) for p in params):
        for gi, group in enumerate(params):
            if "params" not in group:
                raise ValueError(f"param group {gi}: expected a 'params' key")
        return params
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params: expected all arrays or all dicts, got a mix")
    return [{"params": params}]


class Adam(Optimizer):
    """Fused Adam (and AdamW with ``decoupled_weight_decay=True``), PyTorch's algorithm and names.

    ``eps_root`` adds a term inside the square root (``sqrt(v_hat + eps_root) + eps``, as optax);
    ``bias_correction=False`` drops both bias corrections.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        eps_root: float = 0.0,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, eps_root=eps_root, bias_correction=bias_correction,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        AdamHyper.from_kwargs(**defaults)  # refuse bad defaults even when every group overrides them
        super().__init__(params, defaults, backend)

    def state_names(self, hyper: AdamHyper) -> tuple[str, ...]:
        base = ("exp_avg", "exp_avg_sq")
        return (*base, "max_exp_avg_sq") if hyper.amsgrad else base

    def rule(self, hyper: AdamHyper) -> str:
        return "amsgrad" if hyper.amsgrad else "adam"


class AdamW(Adam):
    """Adam with decoupled weight decay (``p *= 1 - lr * weight_decay``), default decay 1e-2."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        eps_root: float = 0.0,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize, eps_root=eps_root,
            bias_correction=bias_correction, decoupled_weight_decay=decoupled_weight_decay,
            backend=backend,
        )
