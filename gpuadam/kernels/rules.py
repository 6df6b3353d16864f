"""Scalar update rules: plain Python, compiled by both Numba targets.

``register_jitable`` lets ``@njit`` loops and ``@cuda.jit`` kernels call these functions (and
them call each other) while they stay ordinary Python for the CUDA simulator.

Each rule takes one element of the parameter, its gradient and its state, and a tuple ``c`` of
per-step constants that the host computed once (see ``gpuadam.hyper``), and returns the new
parameter and state. The constants already carry the parameter's dtype, so no Python float
literal, ``**`` or ``1 - beta`` appears here: any of them would promote float32 math to float64.

Layout of the Adam constants tuple ``c`` (``hyper.AdamHyper.constants`` builds it):

    0 grad_mul       +-1 (maximize) divided by the loss scale
    1 wd_l2          weight_decay for L2 decay, else 0
    2 beta1          3 one_minus_beta1
    4 beta2          5 one_minus_beta2
    6 decay          1 - lr*wd for decoupled decay, else 1
    7 step_size      lr / (1 - beta1**t)      (lr without bias correction)
    8 inv_sqrt_bc2   1 / sqrt(1 - beta2**t)   (1 without bias correction)
    9 eps           10 eps_root_bc2  eps_root * (1 - beta2**t)
   11 skip           nonzero: this step is skipped (a non-finite gradient), nothing changes

Every rule's tuple has ``N_CONSTANTS`` entries with the skip flag last, so one loader
(``load_constants``) and one device-side preparation serve every rule.

``sqrt(v + eps_root*bc2) / sqrt(bc2)`` is ``sqrt(v/bc2 + eps_root)`` without forming ``v/bc2``,
which could overflow where PyTorch's ``sqrt(v)/sqrt(bc2)`` does not.
"""

import math

from numba.extending import register_jitable

N_CONSTANTS = 12
SKIP = N_CONSTANTS - 1


@register_jitable
def load_constants(c):
    """``c`` as a tuple: a no-op for a tuple argument, one load per entry for a device array
    (which the compiler could not otherwise keep in registers across the stores of the loop)."""
    return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11])


@register_jitable
def adam_constants(step, hyper, grad_mul):
    """The float64 Adam constants for step ``step`` (>= 1) from ``AdamHyper.scalars()``.

    Called by the host (as plain Python) and by the device-side preparation kernel, so the two
    agree to the bit. ``grad_mul`` scales the gradient (1/loss scale times the clip factor).
    """
    lr, beta1, beta2, eps, weight_decay, eps_root, maximize, bias_correction, decoupled = hyper
    bc1 = 1.0
    bc2 = 1.0
    if bias_correction != 0.0:
        bc1 = 1.0 - math.pow(beta1, step)
        bc2 = 1.0 - math.pow(beta2, step)
    wd_l2 = weight_decay
    decay = 1.0
    if decoupled != 0.0:
        wd_l2 = 0.0
        decay = 1.0 - lr * weight_decay
    if maximize != 0.0:
        grad_mul = -grad_mul
    return (grad_mul, wd_l2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay, lr / bc1,
            1.0 / math.sqrt(bc2), eps, eps_root * bc2, 0.0)


@register_jitable
def grad_factor(sumsq, nonfinite, inv_scale, max_norm, skip_nonfinite):
    """``(norm, grad_mul, skip)`` from the sum of squares of the (loss-scaled) gradients.

    The norm is of the unscaled gradients; ``grad_mul`` unscales and clips (``min(1, max_norm /
    (norm + 1e-6))`` when ``max_norm > 0``, as ``torch.nn.utils.clip_grad_norm_``); ``skip`` is 1 when
    a gradient was inf or NaN and such steps are to be skipped. Shared by the host and the device.
    """
    norm = math.sqrt(sumsq) * inv_scale
    grad_mul = inv_scale
    if max_norm > 0.0:
        clip = max_norm / (norm + 1e-6)
        if clip < 1.0:
            grad_mul = inv_scale * clip
    skip = 0.0
    if skip_nonfinite != 0.0 and nonfinite != 0.0:
        skip = 1.0
    return norm, grad_mul, skip


@register_jitable
def adam_moments(p, g, m, v, c):
    """The gradient with decay and sign folded in, and the updated first and second moments."""
    g = g * c[0] + c[1] * p
    m = c[2] * m + c[3] * g
    v = c[4] * v + c[5] * g * g
    return m, v


@register_jitable
def adam_param(p, m, v, c):
    """The parameter after decoupled decay and the bias-corrected Adam step."""
    denom = math.sqrt(v + c[10]) * c[8] + c[9]
    return p * c[6] - c[7] * (m / denom)


@register_jitable
def adam_rule(p, g, m, v, c):
    """One Adam/AdamW element update: returns the new ``(p, m, v)``."""
    m, v = adam_moments(p, g, m, v, c)
    return adam_param(p, m, v, c), m, v


@register_jitable
def amsgrad_rule(p, g, m, v, vmax, c):
    """Adam with AMSGrad: the step uses the running maximum of ``v``; returns ``(p, m, v, vmax)``."""
    m, v = adam_moments(p, g, m, v, c)
    vmax = max(vmax, v)
    return adam_param(p, m, vmax, c), m, v, vmax
