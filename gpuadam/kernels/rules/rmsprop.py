"""RMSprop: plain, centered, with momentum, and both (each flag changes the state arrays)."""

import math

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import Rule, layout_of
from gpuadam.kernels.rules.sgd import GRAD_SNIPPET


@register_jitable
def rmsprop_constants(step, hyper, grad_mul):
    """RMSprop from ``RMSpropHyper.scalars()``."""
    lr, alpha, eps, weight_decay, momentum, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    wd_l2 = weight_decay
    one_minus_alpha = 1.0 - alpha
    return (grad_mul, wd_l2, alpha, one_minus_alpha, eps, lr, momentum, 0.0, 0.0, 0.0, 0.0, 0.0)


R = layout_of(rmsprop_constants)


@register_jitable
def rmsprop_square(p, g, sq, c):
    """The gradient with decay and sign folded in, and the new running average of its square."""
    g = g * c[R.grad_mul] + c[R.wd_l2] * p
    sq = c[R.alpha] * sq + c[R.one_minus_alpha] * g * g
    return g, sq


@register_jitable
def rmsprop_rule(p, g, sq, c):
    """RMSprop: returns ``(p, square_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    return p - c[R.lr] * (g / (math.sqrt(sq) + c[R.eps])), sq


@register_jitable
def rmsprop_centered_rule(p, g, sq, gavg, c):
    """Centered RMSprop (the square's average less the squared average): ``(p, square_avg, grad_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    gavg = c[R.alpha] * gavg + c[R.one_minus_alpha] * g
    return p - c[R.lr] * (g / (math.sqrt(sq - gavg * gavg) + c[R.eps])), sq, gavg


@register_jitable
def rmsprop_momentum_rule(p, g, sq, buf, c):
    """RMSprop with momentum: returns ``(p, square_avg, momentum_buffer)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    buf = c[R.momentum] * buf + g / (math.sqrt(sq) + c[R.eps])
    return p - c[R.lr] * buf, sq, buf


@register_jitable
def rmsprop_centered_momentum_rule(p, g, sq, buf, gavg, c):
    """Centered RMSprop with momentum: returns ``(p, square_avg, momentum_buffer, grad_avg)``."""
    g, sq = rmsprop_square(p, g, sq, c)
    gavg = c[R.alpha] * gavg + c[R.one_minus_alpha] * g
    buf = c[R.momentum] * buf + g / (math.sqrt(sq - gavg * gavg) + c[R.eps])
    return p - c[R.lr] * buf, sq, buf, gavg


_SQUARE = GRAD_SNIPPET + "const T sqk = alpha * sq + one_minus_alpha * gk * gk;    /* rmsprop_square */\n"
_CENTER = "const T gak = alpha * gavg + one_minus_alpha * gk;\n"
_SQ, _BUF, _GAVG = ("square_avg", "sq"), ("momentum_buffer", "buf"), ("grad_avg", "gavg")

RMSPROP = Rule("rmsprop", rmsprop_rule, rmsprop_constants, R, (_SQ,), _SQUARE + """\
p = p - lr * (gk / (sqrt(sqk) + eps));
sq = sqk;
""")

RMSPROP_CENTERED = Rule("rmsprop_centered", rmsprop_centered_rule, rmsprop_constants, R, (_SQ, _GAVG),
                        _SQUARE + _CENTER + """\
p = p - lr * (gk / (sqrt(sqk - gak * gak) + eps));
sq = sqk;
gavg = gak;
""")

RMSPROP_MOMENTUM = Rule("rmsprop_momentum", rmsprop_momentum_rule, rmsprop_constants, R, (_SQ, _BUF),
                        _SQUARE + """\
const T bk = momentum * buf + gk / (sqrt(sqk) + eps);
p = p - lr * bk;
sq = sqk;
buf = bk;
""")

RMSPROP_CENTERED_MOMENTUM = Rule("rmsprop_centered_momentum", rmsprop_centered_momentum_rule, rmsprop_constants,
                                 R, (_SQ, _BUF, _GAVG), _SQUARE + _CENTER + """\
const T bk = momentum * buf + gk / (sqrt(sqk - gak * gak) + eps);
p = p - lr * bk;
sq = sqk;
buf = bk;
gavg = gak;
""")

RULES = (RMSPROP, RMSPROP_CENTERED, RMSPROP_MOMENTUM, RMSPROP_CENTERED_MOMENTUM)
