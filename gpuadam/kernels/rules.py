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
    """``(norm, grad_mul, skip)`` from the sum of squares of the unscaled gradients and the count of
    those that are inf or NaN once unscaled.

    ``grad_mul`` unscales and clips (``min(1, max_norm / (norm + 1e-6))`` when ``max_norm > 0``, as
    ``torch.nn.utils.clip_grad_norm_``); ``skip`` is 1 when a gradient was inf or NaN and such steps
    are to be skipped. Shared by the host and the device.
    """
    norm = math.sqrt(sumsq)
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


# ---------------------------------------------------------------------------------------------
# The rest of the family: torch.optim's SGD, RMSprop, Adagrad, Adamax, NAdam and RAdam.
#
# Each constants function has ``adam_constants``'s shape: ``(step, hyper, grad_mul)`` to a float64
# tuple of N_CONSTANTS entries, the skip flag last (0 from the host), entries a rule does not read
# 0; ``hyper`` starts with lr (a capturable step replaces it on the device). Everything that
# depends on the step count is computed here, so the rules read only the tuple. Flags that keep
# the same arrays are entries of the tuple (a uniform branch); flags that change the arrays
# (SGD's momentum, RMSprop's centered and momentum) choose between rules.


@register_jitable
def sgd_constants(step, hyper, grad_mul):
    """SGD from ``SGDHyper.scalars()``.

    Layout: 0 grad_mul, 1 wd_l2, 2 lr, 3 keep (the buffer's factor), 4 take (the gradient's factor
    into the buffer), 5 nesterov (1 or 0), 6 momentum, 11 skip. PyTorch's first momentum step
    copies the gradient into the buffer (keep 0, take 1), later ones take keep = momentum and
    take = 1 - dampening; the exponential average (``ema_momentum``) takes keep = momentum and
    take = 1 - momentum from the first step on.
    """
    lr, momentum, dampening, weight_decay, nesterov, maximize, ema = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    keep = momentum
    take = 1.0 - dampening
    if ema != 0.0:
        take = 1.0 - momentum
    elif step == 1.0:
        keep = 0.0
        take = 1.0
    look = 0.0
    if nesterov != 0.0:
        look = 1.0
    return (grad_mul, weight_decay, lr, keep, take, look, momentum, 0.0, 0.0, 0.0, 0.0, 0.0)


@register_jitable
def sgd_rule(p, g, c):
    """Plain SGD: returns the new ``p``."""
    g = g * c[0] + c[1] * p
    return p - c[2] * g


@register_jitable
def sgd_momentum_rule(p, g, buf, c):
    """SGD with a momentum buffer (PyTorch's, or the exponential average): returns ``(p, buf)``."""
    g = g * c[0] + c[1] * p
    buf = c[3] * buf + c[4] * g
    if c[5] != 0:
        g = g + c[6] * buf  # Nesterov: the gradient plus the look-ahead along the new buffer
    else:
        g = buf
    return p - c[2] * g, buf


@register_jitable
def rmsprop_constants(step, hyper, grad_mul):
    """RMSprop from ``RMSpropHyper.scalars()``.

    Layout: 0 grad_mul, 1 wd_l2, 2 alpha, 3 one_minus_alpha, 4 eps, 5 lr, 6 momentum, 11 skip.
    """
    lr, alpha, eps, weight_decay, momentum, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    return (grad_mul, weight_decay, alpha, 1.0 - alpha, eps, lr, momentum, 0.0, 0.0, 0.0, 0.0, 0.0)


@register_jitable
def rmsprop_square(p, g, sq, c):
    """The gradient with decay and sign folded in, and the new running average of its square."""
    g = g * c[0] + c[1] * p
    sq = c[2] * sq + c[3] * g * g
    return g, sq


@register_jitable
def rmsprop_rule(p, g, sq, c):
    """RMSprop: returns ``(p, square_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    return p - c[5] * (g / (math.sqrt(sq) + c[4])), sq


@register_jitable
def rmsprop_centered_rule(p, g, sq, gavg, c):
    """Centered RMSprop (the square's average less the squared average): ``(p, square_avg, grad_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    gavg = c[2] * gavg + c[3] * g
    return p - c[5] * (g / (math.sqrt(sq - gavg * gavg) + c[4])), sq, gavg


@register_jitable
def rmsprop_momentum_rule(p, g, sq, buf, c):
    """RMSprop with momentum: returns ``(p, square_avg, momentum_buffer)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    buf = c[6] * buf + g / (math.sqrt(sq) + c[4])
    return p - c[5] * buf, sq, buf


@register_jitable
def rmsprop_centered_momentum_rule(p, g, sq, buf, gavg, c):
    """Centered RMSprop with momentum: returns ``(p, square_avg, momentum_buffer, grad_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    gavg = c[2] * gavg + c[3] * g
    buf = c[6] * buf + g / (math.sqrt(sq - gavg * gavg) + c[4])
    return p - c[5] * buf, sq, buf, gavg


@register_jitable
def adagrad_constants(step, hyper, grad_mul):
    """Adagrad from ``AdagradHyper.scalars()``.

    Layout: 0 grad_mul, 1 wd_l2, 2 clr = lr / (1 + (t - 1) lr_decay), 3 eps, 11 skip.
    """
    lr, lr_decay, weight_decay, eps, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    clr = lr / (1.0 + (step - 1.0) * lr_decay)
    return (grad_mul, weight_decay, clr, eps, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@register_jitable
def adagrad_rule(p, g, acc, c):
    """Adagrad: returns ``(p, sum)``, the sum of the squared gradients so far."""
    g = g * c[0] + c[1] * p
    acc = acc + g * g
    return p - c[2] * (g / (math.sqrt(acc) + c[3])), acc


@register_jitable
def adamax_constants(step, hyper, grad_mul):
    """Adamax from ``AdamaxHyper.scalars()``.

    Layout: 0 grad_mul, 1 wd_l2, 2 beta1, 3 one_minus_beta1, 4 beta2, 5 eps,
    6 clr = lr / (1 - beta1**t), 11 skip.
    """
    lr, beta1, beta2, eps, weight_decay, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    clr = lr / (1.0 - math.pow(beta1, step))
    return (grad_mul, weight_decay, beta1, 1.0 - beta1, beta2, eps, clr, 0.0, 0.0, 0.0, 0.0, 0.0)


@register_jitable
def adamax_rule(p, g, m, u, c):
    """Adamax: returns ``(p, exp_avg, exp_inf)``, ``exp_inf`` the decayed infinity norm."""
    g = g * c[0] + c[1] * p
    m = c[2] * m + c[3] * g
    u = max(c[4] * u, abs(g) + c[5])
    return p - c[6] * (m / u), m, u


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
    """NAdam from ``NAdamHyper.scalars()``.

    Layout: 0..6 and 8, 9 as Adam's (grad_mul, wd_l2, beta1, one_minus_beta1, beta2,
    one_minus_beta2, decay; inv_sqrt_bc2, eps), 7 grad_step = lr (1 - mu_t) / (1 - prod mu_1..t),
    10 avg_step = lr mu_{t+1} / (1 - prod mu_1..t+1), 11 skip.
    """
    lr, beta1, beta2, eps, weight_decay, momentum_decay, maximize, decoupled = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    decay = 1.0
    if decoupled != 0.0:
        wd_l2 = 0.0
        decay = 1.0 - lr * weight_decay
    bc2 = 1.0 - math.pow(beta2, step)
    mu = beta1 * (1.0 - 0.5 * math.pow(0.96, step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * math.pow(0.96, (step + 1.0) * momentum_decay))
    rest = 1.0  # 1 - the product of the mu (1 when beta1 = 0: every mu is 0)
    rest_next = 1.0
    if beta1 > 0.0:
        log_product = nadam_log_mu_product(step, beta1, momentum_decay)
        rest = -math.expm1(log_product)
        rest_next = -math.expm1(log_product + math.log(mu_next))
    return (grad_mul, wd_l2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay, lr * (1.0 - mu) / rest,
            1.0 / math.sqrt(bc2), eps, lr * mu_next / rest_next, 0.0)


@register_jitable
def nadam_rule(p, g, m, v, c):
    """NAdam: the gradient's and the next momentum's shares of the step; returns ``(p, m, v)``."""
    g = g * c[0] + c[1] * p
    m = c[2] * m + c[3] * g
    v = c[4] * v + c[5] * g * g
    denom = math.sqrt(v) * c[8] + c[9]
    return p * c[6] - (c[7] * g + c[10] * m) / denom, m, v


@register_jitable
def radam_constants(step, hyper, grad_mul):
    """RAdam from ``RAdamHyper.scalars()``.

    Layout: 0..6 as Adam's, 7 step_size = lr / (1 - beta1**t), 8 rect_sqrt_bc2 = r_t
    sqrt(1 - beta2**t), 9 eps, 10 adaptive: 1 when rho_t > 5 (the rectified, adaptive step), else
    0 (the un-adapted step ``step_size * m``, and entry 8 is 0), 11 skip.
    """
    lr, beta1, beta2, eps, weight_decay, maximize, decoupled = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    decay = 1.0
    if decoupled != 0.0:
        wd_l2 = 0.0
        decay = 1.0 - lr * weight_decay
    bc1 = 1.0 - math.pow(beta1, step)
    beta2_t = math.pow(beta2, step)
    bc2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / bc2
    adaptive = 0.0
    scale = 0.0
    if rho_t > 5.0:
        adaptive = 1.0
        rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        scale = rect * math.sqrt(bc2)
    return (grad_mul, wd_l2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay, lr / bc1, scale, eps,
            adaptive, 0.0)


@register_jitable
def radam_rule(p, g, m, v, c):
    """RAdam: the rectified adaptive step once rho_t > 5, the bias-corrected momentum before;
    returns ``(p, m, v)``."""
    m, v = adam_moments(p, g, m, v, c)
    p = p * c[6]
    if c[10] != 0:
        p = p - c[7] * m * c[8] / (math.sqrt(v) + c[9])
    else:
        p = p - c[7] * m
    return p, m, v


#: Every rule by kernel name: ``(rule, number of state arrays)``. The Numba CPU and CUDA modules
#: build their loops from this table (the kernel arguments are ``p, g, *state, c``).
RULES = {
    "adam": (adam_rule, 2),
    "amsgrad": (amsgrad_rule, 3),
    "sgd": (sgd_rule, 0),
    "sgd_momentum": (sgd_momentum_rule, 1),
    "rmsprop": (rmsprop_rule, 1),
    "rmsprop_centered": (rmsprop_centered_rule, 2),
    "rmsprop_momentum": (rmsprop_momentum_rule, 2),
    "rmsprop_centered_momentum": (rmsprop_centered_momentum_rule, 3),
    "adagrad": (adagrad_rule, 1),
    "adamax": (adamax_rule, 2),
    "nadam": (nadam_rule, 2),
    "radam": (radam_rule, 2),
}
