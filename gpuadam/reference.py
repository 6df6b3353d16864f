"""float64 NumPy reference of every update rule: the tests' oracle, never a fast path.

Written from PyTorch's documented pseudo-code (``torch.optim.Adam``/``AdamW``), not from
``kernels.rules``, so that the two are independent witnesses of the same algorithm.
"""

from __future__ import annotations

import numpy as np

from gpuadam.hyper import AdamHyper


def adam_reference(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    vmax: np.ndarray | None,
    hyper: AdamHyper,
    step: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One Adam step in float64; returns new ``(p, m, v, vmax)`` (``vmax`` None without AMSGrad)."""
    p, g, m, v = (np.asarray(x, dtype=np.float64) for x in (p, g, m, v))
    b1, b2, lr, wd = hyper.beta1, hyper.beta2, hyper.lr, hyper.weight_decay
    if hyper.maximize:
        g = -g
    if wd != 0.0:
        if hyper.decoupled_weight_decay:
            p = p * (1.0 - lr * wd)
        else:
            g = g + wd * p
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    if vmax is not None:
        vmax = np.maximum(np.asarray(vmax, dtype=np.float64), v)
    v_used = vmax if vmax is not None else v
    if hyper.bias_correction:
        bc1 = 1.0 - b1**step
        bc2 = 1.0 - b2**step
    else:
        bc1 = bc2 = 1.0
    denom = np.sqrt(v_used / bc2 + hyper.eps_root) + hyper.eps
    p = p - (lr / bc1) * m / denom
    return p, m, v, vmax
