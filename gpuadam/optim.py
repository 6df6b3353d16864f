"""Optimizer classes: parameter groups, state, step counts, ``step()`` and ``state_dict()``.

The shared machinery lives in ``Optimizer``; an optimizer class only names its hyperparameter
record, its state arrays and the kernel rule to launch. ``step()`` validates every gradient and
every group's hyperparameters before the first kernel runs, so a refused step changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gpuadam import backends
from gpuadam.arrays import ArrayInfo, check_grads, check_param, describe
from gpuadam.hyper import AdamHyper


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
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        self._backend = backends.choose(backend, infos[0])
        be = self._backend
        self._flat = [be.flat(p) for p in self._params]
        # state[i]: name -> flat state array of param i, allocated once here, never in step().
        self.state: list[dict[str, Any]] = []
        for group, hyper in zip(self.param_groups, hypers):
            for p in group["params"]:
                self.state.append({name: be.zeros_like(p) for name in self.state_names(hyper)})
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

    def step(self, grads: Sequence[Any]) -> None:
        """Update every parameter and its state in place from ``grads`` (aligned with the params)."""
        check_grads(self._infos, grads)
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        plans = []
        index = 0
        for hyper, group in zip(hypers, self.param_groups):
            names = self.state_names(hyper)
            rule = self.rule(hyper)
            for _ in group["params"]:
                missing = [n for n in names if n not in self.state[index]]
                if missing:
                    raise ValueError(
                        f"param {index}: the hyperparameters now need state {missing} that was not "
                        "allocated at construction (e.g. amsgrad switched on mid-run)"
                    )
                plans.append((index, rule, hyper, names))
                index += 1
        be = self._backend
        constants: dict[tuple, tuple] = {}
        for i, rule, hyper, names in plans:
            step = self.steps[i] + 1
            key = (id(hyper), step)
            c = constants.get(key)
            if c is None:
                c = constants[key] = hyper.constants(step, self._infos[i].dtype)
            state = self.state[i]
            be.launch(rule, (self._flat[i], be.flat(grads[i]), *(state[n] for n in names)), c)
            self.steps[i] = step
        self.last_step_launches = len(plans)

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
