"""Adamax: Adam with the infinity norm in place of the second moment."""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import Rule, layout_of
from gpuadam.kernels.rules.sgd import GRAD_SNIPPET


@register_jitable
def adamax_constants(step, hyper, grad_mul):
    """Adamax from ``AdamaxHyper.scalars()``: ``clr = lr / (1 - beta1**t)``."""
    lr, beta1, beta2, eps, weight_decay, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    one_minus_beta1 = 1.0 - beta1
    clr = lr / (1.0 - math.pow(beta1, step))
    return (grad_mul, wd_l2, beta1, one_minus_beta1, beta2, eps, clr, 0.0, 0.0, 0.0, 0.0, 0.0)


X = layout_of(adamax_constants)


@register_jitable
def adamax_rule(p, g, m, u, c):
    """Adamax: returns ``(p, exp_avg, exp_inf)``, ``exp_inf`` the decayed infinity norm."""
    g = g * c[X.grad_mul] + c[X.wd_l2] * p
    m = c[X.beta1] * m + c[X.one_minus_beta1] * g
    u = max(c[X.beta2] * u, abs(g) + c[X.eps])
    return p - c[X.clr] * (m / u), m, u


ADAMAX = Rule("adamax", adamax_rule, adamax_constants, X, (("exp_avg", "m"), ("exp_inf", "u")),
              GRAD_SNIPPET + """\
const T mk = beta1 * m + one_minus_beta1 * gk;
const T uk = max(beta2 * u, fabs(gk) + eps);
p = p - clr * (mk / uk);
m = mk;
u = uk;
""")

RULES = (ADAMAX,)
