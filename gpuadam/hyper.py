"""Hyperparameter records, their validation, and the per-step constants the kernels receive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuadam.kernels.rules.adagrad import adagrad_constants
from gpuadam.kernels.rules.adam import adam_constants
from gpuadam.kernels.rules.adamax import adamax_constants
from gpuadam.kernels.rules.lion import lion_constants
from gpuadam.kernels.rules.nadam import nadam_constants
from gpuadam.kernels.rules.radam import radam_constants
from gpuadam.kernels.rules.rmsprop import rmsprop_constants
from gpuadam.kernels.rules.sgd import sgd_constants

#: Step counts live in int64 (on the device and in checkpoints): every count is checked against it.
MAX_COUNT = 2**63 - 1


def _number(name: str, value: Any) -> float:
    # A 0-d array (what ``np.array(x)`` or a reduction gives) is one number; a longer array is not,
    # whatever NumPy's truth rules would make of it further down.
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        got = (f"an array of shape {value.shape} and dtype {value.dtype}" if isinstance(value, np.ndarray)
               else f"{type(value).__name__} {value!r}")
        raise TypeError(f"{name} must be a real number, got {got}")
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


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int, or an error naming ``name`` if it is not an integer (Python or NumPy, not a
    bool) in ``[minimum, MAX_COUNT]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not minimum <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**63 - 1] (int64), got {value}")
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
        # iterating an array yields its own scalar type: one rounding, no per-value constructor
        return tuple(np.array(type(self).constants_fn(float(step), self.scalars(), float(grad_mul)), dtype))


# ---------------------------------------------------------------------------------------------
# One record per optimizer, with torch.optim's names, defaults and argument checks. Like PyTorch,
# every rate and decay must be >= 0 and betas in [0, 1); unlike it, NaN and inf are refused too.


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` if it is not a finite number."""
    value = _number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def split_betas(betas: Any) -> tuple[Any, Any]:
    """``(beta1, beta2)`` from the user's ``betas`` pair (checked by the record)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    return beta1, beta2


class _Checked(Hyper):
    """A frozen dataclass record whose fields are validated by the checker ``_checks`` names for each
    (then ``_check_together``), and built from the optimizer's keyword arguments by ``from_kwargs``."""

    _checks: dict = {}

    def __post_init__(self) -> None:
        for name, check in self._checks.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))
        self._check_together()

    def _check_together(self) -> None:
        pass

    @classmethod
    def from_kwargs(cls, **kw: Any) -> Any:
        return cls(**kw)


class _WithBetas(_Checked):
    """A record whose optimizer takes ``betas=(beta1, beta2)``."""

    @classmethod
    def from_kwargs(cls, *, betas: Any = (0.9, 0.999), **kw: Any) -> Any:
        beta1, beta2 = split_betas(betas)
        return cls(beta1=beta1, beta2=beta2, **kw)

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)


@dataclass(frozen=True)
class AdamHyper(_WithBetas):
    """Validated Adam/AdamW hyperparameters (PyTorch's names and meanings)."""

    constants_fn = staticmethod(adam_constants)
    _checks = {"lr": check_nonnegative, "beta1": check_beta, "beta2": check_beta, "eps": check_nonnegative,
               "weight_decay": check_nonnegative, "amsgrad": check_flag, "maximize": check_flag,
               "eps_root": check_nonnegative, "bias_correction": check_flag, "decoupled_weight_decay": check_flag}

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

    def scalars(self) -> tuple[float, ...]:
        """The hyperparameters as the float64 tuple ``kernels.rules.adam.adam_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.eps_root,
                float(self.maximize), float(self.bias_correction), float(self.decoupled_weight_decay))


@dataclass(frozen=True)
class SGDHyper(_Checked):
    """``torch.optim.SGD``'s hyperparameters, and ``ema_momentum``: the textbook momentum
    ``v = momentum v + (1 - momentum) g`` from ``v = 0``, instead of PyTorch's ``v = momentum v +
    (1 - dampening) g`` whose first step sets ``v = g``."""

    constants_fn = staticmethod(sgd_constants)
    _checks = {"lr": check_nonnegative, "momentum": check_nonnegative, "dampening": check_finite,
               "weight_decay": check_nonnegative, "nesterov": check_flag, "maximize": check_flag,
               "ema_momentum": check_flag}

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    ema_momentum: bool = False

    def _check_together(self) -> None:
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening, got "
                             f"momentum={self.momentum!r}, dampening={self.dampening!r}")
        if self.ema_momentum and (self.dampening != 0.0 or self.nesterov):
            raise ValueError("ema_momentum (v = momentum v + (1 - momentum) g) takes no dampening and no "
                             f"nesterov, got dampening={self.dampening!r}, nesterov={self.nesterov!r}")

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.sgd.sgd_constants`` reads."""
        return (self.lr, self.momentum, self.dampening, self.weight_decay, float(self.nesterov),
                float(self.maximize), float(self.ema_momentum))


@dataclass(frozen=True)
class RMSpropHyper(_Checked):
    """``torch.optim.RMSprop``'s hyperparameters."""

    constants_fn = staticmethod(rmsprop_constants)
    _checks = {"lr": check_nonnegative, "alpha": check_nonnegative, "eps": check_nonnegative,
               "weight_decay": check_nonnegative, "momentum": check_nonnegative, "centered": check_flag,
               "maximize": check_flag}

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.rmsprop.rmsprop_constants`` reads (``centered`` picks the rule)."""
        return (self.lr, self.alpha, self.eps, self.weight_decay, self.momentum, float(self.maximize))


@dataclass(frozen=True)
class AdagradHyper(_Checked):
    """``torch.optim.Adagrad``'s hyperparameters."""

    constants_fn = staticmethod(adagrad_constants)
    _checks = {"lr": check_nonnegative, "lr_decay": check_nonnegative, "weight_decay": check_nonnegative,
               "initial_accumulator_value": check_nonnegative, "eps": check_nonnegative,
               "maximize": check_flag}

    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.adagrad.adagrad_constants`` reads (the initial value is the
        state's, not the kernel's)."""
        return (self.lr, self.lr_decay, self.weight_decay, self.eps, float(self.maximize))


@dataclass(frozen=True)
class AdamaxHyper(_WithBetas):
    """``torch.optim.Adamax``'s hyperparameters."""

    constants_fn = staticmethod(adamax_constants)
    _checks = {"lr": check_nonnegative, "beta1": check_beta, "beta2": check_beta, "eps": check_nonnegative,
               "weight_decay": check_nonnegative, "maximize": check_flag}

    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.adamax.adamax_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, float(self.maximize))


@dataclass(frozen=True)
class NAdamHyper(_WithBetas):
    """``torch.optim.NAdam``'s hyperparameters."""

    constants_fn = staticmethod(nadam_constants)
    _checks = {"lr": check_nonnegative, "beta1": check_beta, "beta2": check_beta, "eps": check_nonnegative,
               "weight_decay": check_nonnegative, "momentum_decay": check_nonnegative,
               "decoupled_weight_decay": check_flag, "maximize": check_flag}

    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.nadam.nadam_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.momentum_decay,
                float(self.maximize), float(self.decoupled_weight_decay))


@dataclass(frozen=True)
class RAdamHyper(_WithBetas):
    """``torch.optim.RAdam``'s hyperparameters."""

    constants_fn = staticmethod(radam_constants)
    _checks = {"lr": check_nonnegative, "beta1": check_beta, "beta2": check_beta, "eps": check_nonnegative,
               "weight_decay": check_nonnegative, "decoupled_weight_decay": check_flag, "maximize": check_flag}

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.radam.radam_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, float(self.maximize),
                float(self.decoupled_weight_decay))


@dataclass(frozen=True)
class LionHyper(_WithBetas):
    """Lion's hyperparameters (Chen et al., 2023): lr, the interpolation and momentum betas, decoupled
    weight decay."""

    constants_fn = staticmethod(lion_constants)
    _checks = {"lr": check_nonnegative, "beta1": check_beta, "beta2": check_beta,
               "weight_decay": check_nonnegative, "maximize": check_flag}

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    maximize: bool = False

    def scalars(self) -> tuple[float, ...]:
        """The float64 tuple ``kernels.rules.lion.lion_constants`` reads."""
        return (self.lr, self.beta1, self.beta2, self.weight_decay, float(self.maximize))
