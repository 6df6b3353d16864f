"""RAdam: Adam whose adaptive step is rectified, and skipped while its variance is intractable."""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.adam import MOMENTS_SNIPPET, adam_moments, check_moment_slots, weight_decay_terms
from gpuadam.kernels.rules.common import Rule, layout_of


@register_jitable
def radam_constants(step, hyper, grad_mul):
    """RAdam from ``RAdamHyper.scalars()``: Adam's moment constants, ``step_size = lr / (1 -
    beta1**t)``, ``rect_sqrt_bc2 = r_t sqrt(1 - beta2**t)``, and ``adaptive``: 1 when rho_t > 5
    (the rectified, adaptive step), else 0 (the un-adapted step ``step_size * m``)."""
    lr, beta1, beta2, eps, weight_decay, maximize, decoupled = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2, decay = weight_decay_terms(lr, weight_decay, decoupled)
    bc1 = 1.0 - math.pow(beta1, step)
    beta2_t = math.pow(beta2, step)
    bc2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / bc2
    adaptive = 0.0
    rect_sqrt_bc2 = 0.0
    if rho_t > 5.0:
        adaptive = 1.0
        rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        rect_sqrt_bc2 = rect * math.sqrt(bc2)
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2
    step_size = lr / bc1
    return (grad_mul, wd_l2, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
            rect_sqrt_bc2, eps, adaptive, 0.0)


D = layout_of(radam_constants)
check_moment_slots(D)


@register_jitable
def radam_rule(p, g, m, v, c):
    """RAdam: the rectified adaptive step once rho_t > 5, the bias-corrected momentum before;
    returns ``(p, m, v)``."""
    m, v = adam_moments(p, g, m, v, c)  # RAdam's moment constants are Adam's, slot for slot
    p = p * c[D.decay]
    if c[D.adaptive] != 0:
        p = p - c[D.step_size] * m * c[D.rect_sqrt_bc2] / (math.sqrt(v) + c[D.eps])
    else:
        p = p - c[D.step_size] * m
    return p, m, v


RADAM = Rule("radam", radam_rule, radam_constants, D, (("exp_avg", "m"), ("exp_avg_sq", "v")),
             MOMENTS_SNIPPET + """\
const T pk = p * decay;                                  /* radam_rule */
p = adaptive ? pk - step_size * mk * rect_sqrt_bc2 / (sqrt(vk) + eps) : pk - step_size * mk;
m = mk;
v = vk;
""")

RULES = (RADAM,)
