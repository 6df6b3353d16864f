"""Adagrad: the sum of the squared gradients so far scales each step."""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import Rule, layout_of
from gpuadam.kernels.rules.sgd import GRAD_SNIPPET


@register_jitable
def adagrad_constants(step, hyper, grad_mul):
    """Adagrad from ``AdagradHyper.scalars()``: ``clr = lr / (1 + (t - 1) lr_decay)``."""
    lr, lr_decay, weight_decay, eps, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    clr = lr / (1.0 + (step - 1.0) * lr_decay)
    return (grad_mul, wd_l2, clr, eps, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


G = layout_of(adagrad_constants)


@register_jitable
def adagrad_rule(p, g, acc, c):
    """Adagrad: returns ``(p, sum)``, the sum of the squared gradients so far."""
    g = g * c[G.grad_mul] + c[G.wd_l2] * p
    acc = acc + g * g
    return p - c[G.clr] * (g / (math.sqrt(acc) + c[G.eps])), acc


ADAGRAD = Rule("adagrad", adagrad_rule, adagrad_constants, G, (("sum", "acc"),), GRAD_SNIPPET + """\
const T acck = acc + gk * gk;
p = p - clr * (gk / (sqrt(acck) + eps));
acc = acck;
""")

RULES = (ADAGRAD,)
