"""SGD, plain and with momentum (PyTorch's, Nesterov's, or the textbook exponential average)."""

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import SKIP_LINE, Rule, layout_of


@register_jitable
def sgd_constants(step, hyper, grad_mul):
    """SGD from ``SGDHyper.scalars()``.

    PyTorch's first momentum step copies the gradient into the buffer (keep 0, take 1), later ones
    take keep = momentum and take = 1 - dampening; the exponential average (``ema_momentum``)
    takes keep = momentum and take = 1 - momentum from the first step on. ``nesterov`` is 1 or 0.
    """
    lr, momentum, dampening, weight_decay, nesterov_flag, maximize, ema = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    keep = momentum
    take = 1.0 - dampening
    if ema != 0.0:
        take = 1.0 - momentum
    elif step == 1.0:
        keep = 0.0
        take = 1.0
    nesterov = 0.0
    if nesterov_flag != 0.0:
        nesterov = 1.0
    return (grad_mul, wd_l2, lr, keep, take, nesterov, momentum, 0.0, 0.0, 0.0, 0.0, 0.0)


S = layout_of(sgd_constants)


@register_jitable
def sgd_rule(p, g, c):
    """Plain SGD: returns the new ``p``."""
    g = g * c[S.grad_mul] + c[S.wd_l2] * p
    return p - c[S.lr] * g


@register_jitable
def sgd_momentum_rule(p, g, buf, c):
    """SGD with a momentum buffer (PyTorch's, or the exponential average): returns ``(p, buf)``."""
    g = g * c[S.grad_mul] + c[S.wd_l2] * p
    buf = c[S.keep] * buf + c[S.take] * g
    if c[S.nesterov] != 0:
        g = g + c[S.momentum] * buf  # Nesterov: the gradient plus the look-ahead along the new buffer
    else:
        g = buf
    return p - c[S.lr] * g, buf


GRAD_SNIPPET = SKIP_LINE + "const T gk = g * grad_mul + wd_l2 * p;\n"

SGD = Rule("sgd", sgd_rule, sgd_constants, S, (), GRAD_SNIPPET + """\
p = p - lr * gk;
""")

SGD_MOMENTUM = Rule("sgd_momentum", sgd_momentum_rule, sgd_constants, S, (("momentum_buffer", "buf"),),
                    GRAD_SNIPPET + """\
const T bk = keep * buf + take * gk;
const T dk = nesterov ? gk + momentum * bk : bk;          /* Nesterov's look-ahead, or the buffer */
p = p - lr * dk;
buf = bk;
""")

RULES = (SGD, SGD_MOMENTUM)
