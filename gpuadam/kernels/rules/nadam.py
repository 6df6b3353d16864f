"""NAdam: Adam with Nesterov momentum and PyTorch's momentum-decay schedule."""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.adam import MOMENTS_SNIPPET, adam_moments, check_moment_slots, weight_decay_terms
from gpuadam.kernels.rules.common import Rule, layout_of


@register_jitable
def nadam_log_mu_product(step, beta1, momentum_decay):
    """``log(mu_1 mu_2 ... mu_t)`` of NAdam's ``mu_k = beta1 (1 - 0.5 * 0.96**(k psi))``, for beta1 > 0.

    PyTorch multiplies ``mu_product`` by ``mu_t`` every step; a function of the step count alone
    serves the host and the device alike, and costs the same at step 10**6 as at step 1:
    ``log(1 - x) = -sum_n x**n / n`` with ``x = 0.5 q**k`` (``q = 0.96**psi``) turns the sum over
    k of the logs into ``-sum_n 0.5**n / n * sum_k q**(n k)``, whose inner sum is geometric,
    ``q**n (1 - q**(n t)) / (1 - q**n)`` (``t`` when ``q = 1``). The terms are positive and each
    at most half the one before: at most 64 of them reach float64 precision.
    """
    lq = momentum_decay * math.log(0.96)
    total = 0.0
    weight = 1.0
    for n in range(1, 65):
        weight *= 0.5
        if lq == 0.0:
            inner = step
        else:
            inner = math.exp(n * lq) * (math.expm1(n * step * lq) / math.expm1(n * lq))
        term = weight / n * inner
        total += term
        if term <= total * 1e-17:
            break
    return step * math.log(beta1) - total


@register_jitable
def nadam_constants(step, hyper, grad_mul):
    """NAdam from ``NAdamHyper.scalars()``: Adam's moment constants, ``grad_step = lr (1 - mu_t) /
    (1 - prod mu_1..t)`` and ``avg_step = lr mu_{t+1} / (1 - prod mu_1..t+1)``."""
    lr, beta1, beta2, eps, weight_decay, momentum_decay, maximize, decoupled = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2, decay = weight_decay_terms(lr, weight_decay, decoupled)
    bc2 = 1.0 - math.pow(beta2, step)
    mu = beta1 * (1.0 - 0.5 * math.pow(0.96, step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * math.pow(0.96, (step + 1.0) * momentum_decay))
    rest = 1.0  # 1 - the product of the mu (1 when beta1 = 0: every mu is 0)
    rest_next = 1.0
    if beta1 > 0.0:
        log_product = nadam_log_mu_product(step, beta1, momentum_decay)
        rest = -math.expm1(log_product)
        rest_next = -math.expm1(log_product + math.log(mu_next))
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2
    grad_step = lr * (1.0 - mu) / rest
    inv_sqrt_bc2 = 1.0 / math.sqrt(bc2)
    avg_step = lr * mu_next / rest_next
    return (grad_mul, wd_l2, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, grad_step,
            inv_sqrt_bc2, eps, avg_step, 0.0)


N = layout_of(nadam_constants)
check_moment_slots(N)


@register_jitable
def nadam_rule(p, g, m, v, c):
    """NAdam: the gradient's and the next momentum's shares of the step; returns ``(p, m, v)``."""
    m, v = adam_moments(p, g, m, v, c)  # NAdam's moment constants are Adam's, slot for slot
    g = g * c[N.grad_mul] + c[N.wd_l2] * p
    denom = math.sqrt(v) * c[N.inv_sqrt_bc2] + c[N.eps]
    return p * c[N.decay] - (c[N.grad_step] * g + c[N.avg_step] * m) / denom, m, v


NADAM = Rule("nadam", nadam_rule, nadam_constants, N, (("exp_avg", "m"), ("exp_avg_sq", "v")),
             MOMENTS_SNIPPET + """\
const T denom = sqrt(vk) * inv_sqrt_bc2 + eps;           /* nadam_rule */
p = p * decay - (grad_step * gk + avg_step * mk) / denom;
m = mk;
v = vk;
""")

RULES = (NADAM,)
