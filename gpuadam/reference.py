"""float64 NumPy reference of every update rule: the tests' oracle, never a fast path.

Written from the documented pseudo-code (``torch.optim``'s; Lion's paper), not from
``kernels.rules``, so that the two are independent witnesses of the same algorithm. ``REFERENCES``
gives each optimizer's by class name; every one has the same signature.
"""

from __future__ import annotations

import numpy as np

from gpuadam.hyper import (
    AdagradHyper,
    AdamaxHyper,
    AdamHyper,
    LionHyper,
    NAdamHyper,
    RAdamHyper,
    RMSpropHyper,
    SGDHyper,
)

# Every reference takes one parameter, its gradient, its state as a dict of PyTorch's state names
# (empty before the first step: each function starts its state as PyTorch does), the
# hyperparameters and the step number t (1-based), and returns the new parameter and state, in
# float64, from the pseudo-code of torch.optim's documentation (Lion: its paper's). ``maximize``
# negates the gradient before weight decay is added, as PyTorch's code does.


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _gradient(p: np.ndarray, g: np.ndarray, hyper, decoupled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(p, g)`` after the sign and the weight decay: L2 into the gradient, or decoupled into p."""
    g = -_f64(g) if hyper.maximize else _f64(g)
    if hyper.weight_decay != 0.0:
        if decoupled:
            p = p * (1.0 - hyper.lr * hyper.weight_decay)
        else:
            g = g + hyper.weight_decay * p
    return p, g


def adam_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: AdamHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One Adam/AdamW step (AMSGrad's ``max_exp_avg_sq`` with ``amsgrad``); ``eps_root`` inside the
    root and ``bias_correction=False`` as gpuadam's ``Adam`` documents them."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper, hyper.decoupled_weight_decay)
    state = dict(state)
    zeros = np.zeros_like(p)
    b1, b2 = hyper.beta1, hyper.beta2
    m = b1 * state.get("exp_avg", zeros) + (1.0 - b1) * g
    v = b2 * state.get("exp_avg_sq", zeros) + (1.0 - b2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    if hyper.amsgrad:
        v = state["max_exp_avg_sq"] = np.maximum(_f64(state.get("max_exp_avg_sq", zeros)), v)
    bc1, bc2 = (1.0 - b1**step, 1.0 - b2**step) if hyper.bias_correction else (1.0, 1.0)
    denom = np.sqrt(v / bc2 + hyper.eps_root) + hyper.eps
    return p - (hyper.lr / bc1) * m / denom, state


def sgd_reference(p: np.ndarray, g: np.ndarray, state: dict, hyper: SGDHyper, step: int) -> tuple[np.ndarray, dict]:
    """One SGD step: PyTorch's momentum (``b_1 = g_1``, then ``b_t = mu b + (1 - dampening) g``),
    Nesterov's ``g + mu b_t``, or with ``ema_momentum`` the textbook ``b_t = mu b + (1 - mu) g``
    from ``b_0 = 0``."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper)
    state = dict(state)
    mu = hyper.momentum
    if mu != 0.0:
        if hyper.ema_momentum:
            b = mu * state.get("momentum_buffer", np.zeros_like(p)) + (1.0 - mu) * g
        elif step > 1:
            b = mu * state["momentum_buffer"] + (1.0 - hyper.dampening) * g
        else:
            b = g.copy()
        state["momentum_buffer"] = b
        g = g + mu * b if hyper.nesterov else b
    return p - hyper.lr * g, state


def rmsprop_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: RMSpropHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One RMSprop step: ``v = alpha v + (1 - alpha) g^2``, centered by the squared average of g,
    with or without momentum on ``g / (sqrt(v~) + eps)``."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper)
    state = dict(state)
    zeros = np.zeros_like(p)
    a = hyper.alpha
    v = a * state.get("square_avg", zeros) + (1.0 - a) * g**2
    state["square_avg"] = v
    v_tilde = v
    if hyper.centered:
        g_ave = a * state.get("grad_avg", zeros) + (1.0 - a) * g
        state["grad_avg"] = g_ave
        v_tilde = v - g_ave**2
    scaled = g / (np.sqrt(v_tilde) + hyper.eps)
    if hyper.momentum > 0.0:
        b = hyper.momentum * state.get("momentum_buffer", zeros) + scaled
        state["momentum_buffer"] = b
        return p - hyper.lr * b, state
    return p - hyper.lr * scaled, state


def adagrad_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: AdagradHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One Adagrad step: the sum of squares from ``initial_accumulator_value``, the rate decayed as
    ``lr / (1 + (t - 1) lr_decay)``."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper)
    state = dict(state)
    total = state.get("sum", np.full_like(p, hyper.initial_accumulator_value)) + g**2
    state["sum"] = total
    lr_t = hyper.lr / (1.0 + (step - 1) * hyper.lr_decay)
    return p - lr_t * g / (np.sqrt(total) + hyper.eps), state


def adamax_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: AdamaxHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One Adamax step: the infinity norm ``u = max(beta2 u, |g| + eps)`` in place of Adam's v."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper)
    state = dict(state)
    zeros = np.zeros_like(p)
    b1, b2 = hyper.beta1, hyper.beta2
    m = b1 * state.get("exp_avg", zeros) + (1.0 - b1) * g
    u = np.maximum(b2 * state.get("exp_inf", zeros), np.abs(g) + hyper.eps)
    state["exp_avg"], state["exp_inf"] = m, u
    return p - hyper.lr * m / ((1.0 - b1**step) * u), state


def nadam_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: NAdamHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One NAdam step, with PyTorch's momentum schedule ``mu_t = beta1 (1 - 0.5 * 0.96**(t psi))``;
    ``state["mu_product"]`` carries the product of the ``mu`` so far (a float, 1 before step 1)."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper, hyper.decoupled_weight_decay)
    state = dict(state)
    zeros = np.zeros_like(p)
    b1, b2, psi = hyper.beta1, hyper.beta2, hyper.momentum_decay
    mu = b1 * (1.0 - 0.5 * 0.96 ** (step * psi))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
    product = state.get("mu_product", 1.0) * mu
    m = b1 * state.get("exp_avg", zeros) + (1.0 - b1) * g
    v = b2 * state.get("exp_avg_sq", zeros) + (1.0 - b2) * g**2
    state["exp_avg"], state["exp_avg_sq"], state["mu_product"] = m, v, product
    m_hat = mu_next * m / (1.0 - product * mu_next) + (1.0 - mu) * g / (1.0 - product)
    v_hat = v / (1.0 - b2**step)
    return p - hyper.lr * m_hat / (np.sqrt(v_hat) + hyper.eps), state


def radam_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: RAdamHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One RAdam step: the variance-rectified adaptive step when the SMA length ``rho_t > 5``, the
    bias-corrected momentum step before."""
    p = _f64(p)
    p, g = _gradient(p, g, hyper, hyper.decoupled_weight_decay)
    state = dict(state)
    zeros = np.zeros_like(p)
    b1, b2 = hyper.beta1, hyper.beta2
    m = b1 * state.get("exp_avg", zeros) + (1.0 - b1) * g
    v = b2 * state.get("exp_avg_sq", zeros) + (1.0 - b2) * g**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1.0 - b1**step)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho_t = rho_inf - 2.0 * step * b2**step / (1.0 - b2**step)
    if rho_t > 5.0:
        l_t = np.sqrt(1.0 - b2**step) / (np.sqrt(v) + hyper.eps)
        r_t = np.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        return p - hyper.lr * m_hat * r_t * l_t, state
    return p - hyper.lr * m_hat, state


def lion_reference(
    p: np.ndarray, g: np.ndarray, state: dict, hyper: LionHyper, step: int
) -> tuple[np.ndarray, dict]:
    """One Lion step, the paper's pseudo-code: ``c = b1 m + (1 - b1) g``, ``p -= lr (sign(c) + wd p)``,
    ``m = b2 m + (1 - b2) g``."""
    p = _f64(p)
    g = -_f64(g) if hyper.maximize else _f64(g)
    state = dict(state)
    m = state.get("exp_avg", np.zeros_like(p))
    c = hyper.beta1 * m + (1.0 - hyper.beta1) * g
    p = p - hyper.lr * (np.sign(c) + hyper.weight_decay * p)
    state["exp_avg"] = hyper.beta2 * m + (1.0 - hyper.beta2) * g
    return p, state


#: The reference of every optimizer, by class name.
REFERENCES = {
    "Adam": adam_reference,
    "AdamW": adam_reference,
    "SGD": sgd_reference,
    "RMSprop": rmsprop_reference,
    "Adagrad": adagrad_reference,
    "Adamax": adamax_reference,
    "NAdam": nadam_reference,
    "RAdam": radam_reference,
    "Lion": lion_reference,
}
