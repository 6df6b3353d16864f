"""The family's test cases (every optimizer, Adam and AdamW included, and flag combination) and their
float64 reference runs, shared by the CPU, PyTorch-parity, simulator and CuPy-snippet tests."""

from __future__ import annotations

import numpy as np
from helpers import FLAG_GRID

import gpuadam
from gpuadam.reference import REFERENCES

# The optimizers whose signature follows torch.optim's to the letter (tests of names and defaults).
# Adam and AdamW are not here: their ``maximize`` is positional, where PyTorch's is keyword-only,
# and ``eps_root`` and ``bias_correction`` are theirs alone.
NAMES = ("SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Lion")


def _adam_keywords(flags: dict) -> dict:
    """A ``helpers.FLAG_GRID`` entry (``AdamHyper`` fields) as ``Adam``'s constructor keywords."""
    kw = {k: v for k, v in flags.items() if k not in ("beta1", "beta2")}
    if "beta1" in flags or "beta2" in flags:
        kw["betas"] = (flags.get("beta1", 0.9), flags.get("beta2", 0.999))
    return kw


ADAM_CASES = [("Adam", _adam_keywords(flags)) for flags in FLAG_GRID] + [
    ("Adam", {"maximize": True, "weight_decay": 0.1}),
    ("Adam", {"betas": (0.5, 0.9), "eps": 1e-6, "lr": 1e-2}),
    ("Adam", {"eps_root": 1e-6, "bias_correction": False, "amsgrad": True}),
    ("Adam", {"amsgrad": True, "betas": (0.9, 0.5)}),  # v falls often: the max binds (with beta2 near 1 it hardly does)
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.3, "amsgrad": True, "lr": 3e-3}),
    ("AdamW", {"maximize": True, "eps_root": 1e-8}),
    ("AdamW", {"decoupled_weight_decay": False}),  # AdamW that is Adam with L2 decay 1e-2
]

# lr is set where the default moves too little for a wrong term to show in a 20-step trajectory.
CASES = ADAM_CASES + [
    ("SGD", {"lr": 0.05}),
    ("SGD", {"lr": 0.05, "weight_decay": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "ema_momentum": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "ema_momentum": True, "weight_decay": 0.1, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9}),
    ("RMSprop", {"centered": True, "momentum": 0.9}),
    ("RMSprop", {"weight_decay": 0.1, "maximize": True}),
    ("RMSprop", {"alpha": 0.0}),
    ("RMSprop", {"alpha": 0.5, "eps": 1e-3, "centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {}),
    ("Adagrad", {"lr_decay": 0.1}),
    ("Adagrad", {"initial_accumulator_value": 0.5}),
    ("Adagrad", {"weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 2.0, "eps": 0.0, "weight_decay": 0.01}),
    ("Adamax", {}),
    ("Adamax", {"weight_decay": 0.1}),
    ("Adamax", {"maximize": True}),
    ("Adamax", {"betas": (0.5, 0.9), "eps": 1e-3, "lr": 1e-2}),
    ("Adamax", {"betas": (0.0, 0.0)}),
    ("NAdam", {}),
    ("NAdam", {"weight_decay": 0.1}),
    ("NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("NAdam", {"maximize": True}),
    ("NAdam", {"momentum_decay": 0.0}),
    ("NAdam", {"momentum_decay": 0.5, "betas": (0.99, 0.9), "lr": 1e-2}),
    ("NAdam", {"betas": (0.0, 0.999)}),
    ("RAdam", {}),  # un-adapted steps 1-5, rectified from step 6
    ("RAdam", {"weight_decay": 0.1}),
    ("RAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("RAdam", {"betas": (0.9, 0.9), "lr": 1e-2}),
    ("RAdam", {"betas": (0.5, 0.0)}),  # rho_inf = 1: never rectified
    ("Lion", {"lr": 1e-3}),
    ("Lion", {"lr": 1e-3, "weight_decay": 0.5}),
    ("Lion", {"lr": 1e-3, "betas": (0.5, 0.9), "maximize": True}),
    ("Lion", {"lr": 1e-3, "betas": (0.0, 0.0), "weight_decay": 0.1}),
]


def case_id(case) -> str:
    name, kw = case
    return name + ("-" + ",".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


def describe(name: str, kw: dict):
    """``(hyper, rule, state names, state start values)`` of optimizer ``name`` built with ``kw``."""
    opt = getattr(gpuadam, name)([np.zeros(1, np.float32)], **kw)
    hyper = opt.hyper_class.from_kwargs(**opt.defaults)
    return hyper, opt.rule(hyper), opt.state_names(hyper), opt.state_init(hyper)


def reference_run(name: str, hyper, params0, grads_seq, first_step: int = 1, states0=None):
    """float64 ``(p, state)`` of every tensor after ``grads_seq`` from ``params0`` (and ``states0``)."""
    ref = REFERENCES[name]
    out = []
    for i, p0 in enumerate(params0):
        p = p0.astype(np.float64)
        state = {} if states0 is None else dict(states0[i])
        for t, grads in enumerate(grads_seq, start=first_step):
            p, state = ref(p, grads[i], state, hyper, t)
        out.append((p, state))
    return out


def torch_takes(torch, name: str, kw: dict) -> bool:
    """Whether ``torch.optim`` has the optimizer and every keyword of a case: the textbook momentum
    (``ema_momentum``), Adam's ``eps_root`` and ``bias_correction=False``, AdamW's
    ``decoupled_weight_decay`` and the optimizers torch.optim lacks (Lion) are ours alone."""
    import inspect

    return hasattr(torch.optim, name) and set(kw) <= set(inspect.signature(getattr(torch.optim, name)).parameters)
