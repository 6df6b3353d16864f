"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolation of the momentum and the gradient is the step; one state array."""

from numba.extending import register_jitable

from gpuadam.kernels.rules.common import SKIP_LINE, Rule, layout_of


@register_jitable
def lion_constants(step, hyper, grad_mul):
    """Lion from ``LionHyper.scalars()``: decoupled decay ``decay = 1 - lr*wd``, no bias correction."""
    lr, beta1, beta2, weight_decay, maximize = hyper
    if maximize != 0.0:
        grad_mul = -grad_mul
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2
    decay = 1.0 - lr * weight_decay
    zero = 0.0  # compared with in the kernel's dtype: a literal 0 would compare in float64
    neg_lr = -lr
    return (grad_mul, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr, zero, neg_lr, 0.0, 0.0, 0.0)


L = layout_of(lion_constants)


@register_jitable
def lion_rule(p, g, m, c):
    """Lion: ``p`` moves by ``lr`` against the sign of ``beta1 m + (1 - beta1) g`` (not at all where
    that is 0, NaN where it is NaN, as ``torch.sign``); returns ``(p, exp_avg)``."""
    g = g * c[L.grad_mul]
    u = c[L.beta1] * m + c[L.one_minus_beta1] * g
    if u > c[L.zero]:
        d = c[L.lr]
    elif u < c[L.zero]:
        d = c[L.neg_lr]
    else:
        d = u * c[L.lr]
    m = c[L.beta2] * m + c[L.one_minus_beta2] * g
    return p * c[L.decay] - d, m


LION = Rule("lion", lion_rule, lion_constants, L, (("exp_avg", "m"),), SKIP_LINE + """\
const T gk = g * grad_mul;
const T uk = beta1 * m + one_minus_beta1 * gk;
const T dk = uk > zero ? lr : (uk < zero ? neg_lr : uk * lr);   /* lr times the sign of uk */
p = p * decay - dk;
m = beta2 * m + one_minus_beta2 * gk;
""")

RULES = (LION,)
