"""Hyperparameter records, their validation, and the per-step constants the kernels receive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuadam.kernels.rules import adam_constants


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` if it is not a finite number >= 0."""
    value = _number(name, value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` if it is not a finite number > 0."""
    value = check_nonnegative(name, value)
    if value == 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_beta(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` if it is outside [0, 1)."""
    value = _number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


class Hyper:
    """Base of the hyperparameter records: ``scalars()`` feeds the rule's constants function."""

    #: ``f(step, scalars, grad_mul) -> float64 tuple`` from ``kernels.rules`` (register_jitable).
    constants_fn: Any = None

    def scalars(self) -> tuple[float, ...]:
        raise NotImplementedError

    def constants(self, step: int, dtype: Any, grad_mul: float = 1.0) -> tuple:
        """The per-step constants tuple of ``kernels.rules`` for step ``step`` (1-based), as ``dtype``.

        ``grad_mul`` multiplies the gradient (``1 / loss_scale``, times a clip factor). Computed in
        float64, once per step, and rounded once to the kernel's dtype.
        """
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        scalar = np.dtype(dtype).type
        return tuple(scalar(x) for x in type(self).constants_fn(float(step), self.scalars(), float(grad_mul)))


@dataclass(frozen=True)
class AdamHyper(Hyper):
    """Validated Adam/AdamW hyperparameters (PyTorch's names and meanings)."""

    constants_fn = staticmethod(adam_constants)

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    eps_root: float = 0.0
    bias_correction: bool = True
    decoupled_weight_decay: bool = False

    @classmethod
    def from_kwargs(cls, *, betas: Any = (0.9, 0.999), **kw: Any) -> AdamHyper:
        """Validate user-facing arguments (``betas`` as a pair) into a record."""
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        return cls(beta1=beta1, beta2=beta2, **kw)

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "eps_root"):
            object.__setattr__(self, name, check_nonnegative(name, getattr(self, name)))
        for name in ("beta1", "beta2"):
            object.__setattr__(self, name, check_beta(name, getattr(self, name)))
        for name in ("amsgrad", "maximize", "bias_correction", "decoupled_weight_decay"):
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def scalars(self) -> tuple[float, ...]:
        """The hyperparameters as the float64 tuple ``kernels.rules.adam_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.eps_root,
                float(self.maximize), float(self.bias_correction), float(self.decoupled_weight_decay))
