"""Adam and AMSGrad (and AdamW: decoupled decay is a constant of the same rules).

``sqrt(v + eps_root*bc2) / sqrt(bc2)`` is ``sqrt(v/bc2 + eps_root)`` without forming ``v/bc2``,
which could overflow where PyTorch's ``sqrt(v)/sqrt(bc2)`` does not.
"""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import SKIP_LINE, Rule, layout_of


@register_jitable
def weight_decay_terms(lr, weight_decay, decoupled):
    """``(wd_l2, decay)``: L2 decay added to the gradient, or (``decoupled``) the param's own decay
    ``1 - lr*wd`` (AdamW). Adam, NAdam and RAdam take both flavours."""
    if decoupled != 0.0:
        return 0.0, 1.0 - lr * weight_decay
    return weight_decay, 1.0


@register_jitable
def adam_constants(step, hyper, grad_mul):
    """The float64 Adam constants for step ``step`` (>= 1) from ``AdamHyper.scalars()``.

    ``grad_mul`` scales the gradient (+-1 for maximize, over the loss scale, times the clip
    factor); ``decay`` is ``1 - lr*wd`` for decoupled decay; ``step_size`` is ``lr / (1 -
    beta1**t)`` and ``inv_sqrt_bc2`` ``1 / sqrt(1 - beta2**t)`` (lr and 1 without bias correction).
    """
    lr, beta1, beta2, eps, weight_decay, eps_root, maximize, bias_correction, decoupled = hyper
    bc1 = 1.0
    bc2 = 1.0
    if bias_correction != 0.0:
        bc1 = 1.0 - math.pow(beta1, step)
        bc2 = 1.0 - math.pow(beta2, step)
    wd_l2, decay = weight_decay_terms(lr, weight_decay, decoupled)
    if maximize != 0.0:
        grad_mul = -grad_mul
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2
    step_size = lr / bc1
    inv_sqrt_bc2 = 1.0 / math.sqrt(bc2)
    eps_root_bc2 = eps_root * bc2
    return (grad_mul, wd_l2, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
            inv_sqrt_bc2, eps, eps_root_bc2, 0.0)


A = layout_of(adam_constants)
MOMENT_SLOTS = ("grad_mul", "wd_l2", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2")


def check_moment_slots(layout) -> None:
    """A rule that calls ``adam_moments`` must keep its six constants where Adam's layout has them."""
    moved = [name for name in MOMENT_SLOTS if getattr(layout, name, None) != getattr(A, name)]
    if moved:
        raise ValueError(f"{type(layout).__name__}: {moved} must sit where adam_constants puts them")


@register_jitable
def adam_moments(p, g, m, v, c):
    """The gradient with decay and sign folded in, and the updated first and second moments."""
    g = g * c[A.grad_mul] + c[A.wd_l2] * p
    m = c[A.beta1] * m + c[A.one_minus_beta1] * g
    v = c[A.beta2] * v + c[A.one_minus_beta2] * g * g
    return m, v


@register_jitable
def adam_param(p, m, v, c):
    """The parameter after decoupled decay and the bias-corrected Adam step."""
    denom = math.sqrt(v + c[A.eps_root_bc2]) * c[A.inv_sqrt_bc2] + c[A.eps]
    return p * c[A.decay] - c[A.step_size] * (m / denom)


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


# No float literal and no double function in the snippets: with T = float every operation stays
# float (``sqrt`` and ``max`` are overloaded for float in CUDA C++, and via std:: on the host).
MOMENTS_SNIPPET = SKIP_LINE + """\
const T gk = g * grad_mul + wd_l2 * p;                   /* adam_moments */
const T mk = beta1 * m + one_minus_beta1 * gk;
const T vk = beta2 * v + one_minus_beta2 * gk * gk;
"""

_STATE = (("exp_avg", "m"), ("exp_avg_sq", "v"))

ADAM = Rule("adam", adam_rule, adam_constants, A, _STATE, MOMENTS_SNIPPET + """\
const T denom = sqrt(vk + eps_root_bc2) * inv_sqrt_bc2 + eps;   /* adam_param */
p = p * decay - step_size * (mk / denom);
m = mk;
v = vk;
""")

AMSGRAD = Rule("amsgrad", amsgrad_rule, adam_constants, A, (*_STATE, ("max_exp_avg_sq", "vmax")),
               MOMENTS_SNIPPET + """\
const T vmaxk = max(vmax, vk);
const T denom = sqrt(vmaxk + eps_root_bc2) * inv_sqrt_bc2 + eps;   /* adam_param */
p = p * decay - step_size * (mk / denom);
m = mk;
v = vk;
vmax = vmaxk;
""")

RULES = (ADAM, AMSGRAD)
