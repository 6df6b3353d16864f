"""``adam_step``: the fused update on caller-owned arrays, for people who keep their own state."""

from __future__ import annotations

from typing import Any

from gpuadam import backends
from gpuadam.arrays import check_apart, check_like, check_param
from gpuadam.hyper import AdamHyper, check_count


def adam_step(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    max_exp_avg_sq: Any = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    eps_root: float = 0.0,
    bias_correction: bool = True,
    decoupled_weight_decay: bool = False,
    backend: str = "auto",
) -> None:
    """Apply Adam step number ``step`` (1-based) to ``param`` and its state, all in place.

    Passing ``max_exp_avg_sq`` turns on AMSGrad. Every array must match ``param`` in shape, dtype
    and device, and be C-contiguous; everything is checked before anything is written.
    """
    step = check_count("step", step, minimum=1)  # NumPy integers too, as load_state_dict takes them
    info, fmt = check_param(0, param)
    if fmt is not None:
        raise TypeError("adam_step works on float32/float64 arrays; use gpuadam.Adam for float16/bfloat16")
    check_like("grad", 0, grad, info, writeable=False)
    state = [exp_avg, exp_avg_sq] + ([] if max_exp_avg_sq is None else [max_exp_avg_sq])
    for name, arr in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state):
        check_like(name, 0, arr, info, writeable=True)
    check_apart([("param", param), ("grad", grad),
                 *zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state)])
    hyper = AdamHyper.from_kwargs(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=max_exp_avg_sq is not None,
        maximize=maximize, eps_root=eps_root, bias_correction=bias_correction,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    be = backends.choose(backend, info)
    arrays = tuple(be.flat(a) for a in (param, grad, *state))
    be.launch("amsgrad" if hyper.amsgrad else "adam", arrays, hyper.constants(step, info.dtype))
