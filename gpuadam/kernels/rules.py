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

``sqrt(v + eps_root*bc2) / sqrt(bc2)`` is ``sqrt(v/bc2 + eps_root)`` without forming ``v/bc2``,
which could overflow where PyTorch's ``sqrt(v)/sqrt(bc2)`` does not.
"""

import math

from numba.extending import register_jitable


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
