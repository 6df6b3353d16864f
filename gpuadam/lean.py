"""Lean optimizer state (``state_dtype=``): which params get it, its arrays' names, dtypes and shapes.

``"int8"``: each moment as uint8 codes (the param's shape) and one float32 absmax per block of
``BLOCK`` elements (``kernels/lean_maps.py``), named ``exp_avg_codes``, ``exp_avg_absmax``,
``exp_avg_sq_codes``, ``exp_avg_sq_absmax``; params under ``MIN_SIZE`` elements keep float32
``exp_avg``/``exp_avg_sq`` (as bitsandbytes). ``"bfloat16"``: each moment as bfloat16 bit
patterns (uint16, the param's shape), ``exp_avg_bf16_bits`` and ``exp_avg_sq_bf16_bits``, rounded
stochastically. Blocks follow each tensor (a FlatBuffer's views each start a block): a group with
lean state steps tensor by tensor. The rules with lean kernels and the kernels' names:
``kernels/lean_rules.py``.
"""

from __future__ import annotations

import numpy as np

from gpuadam.kernels.lean_maps import BLOCK, MIN_SIZE
from gpuadam.kernels.lean_rules import MOMENTS, RULES, kernel, kind_of

__all__ = ["BLOCK", "KERNEL", "MIN_SIZE", "MOMENTS", "NAMES", "RULES", "STATE_DTYPES", "absmax_refusal",
           "check_state_dtype", "kernel", "kind_for", "kind_of", "n_blocks", "rule_refusal", "spec"]

STATE_DTYPES = (None, "bfloat16", "int8")

#: Adam's lean kernel of each format (the layouts' byte ceilings are named after them).
KERNEL = {kind: kernel("adam", kind) for kind in ("int8", "bfloat16")}

#: The moments' array names per format, in the kernel's order.
NAMES = {
    "int8": ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"),
    "bfloat16": ("exp_avg_bf16_bits", "exp_avg_sq_bf16_bits"),
}


def check_state_dtype(value: object) -> str | None:
    """``value`` if it names a state format (None: the params' own), else ValueError."""
    if value not in STATE_DTYPES or isinstance(value, bool):
        raise ValueError(f"state_dtype: expected one of {list(STATE_DTYPES)}, got {value!r}")
    return value  # type: ignore[return-value]


def rule_refusal(state_dtype: str, rule: str) -> str | None:
    """Why ``rule`` cannot keep lean state (its state is not the two moments of ``RULES``), or None."""
    if rule in RULES:
        return None
    return (f"state_dtype={state_dtype!r} is for the rules whose state is {' and '.join(MOMENTS)} "
            f"({', '.join(RULES)}; amsgrad keeps a third array), this group's rule is {rule!r}")


def absmax_refusal(name: str, negatives: int) -> str | None:
    """Why a loaded state array ``name`` holding ``negatives`` values below zero cannot be an
    absmax, or None: each is its block's largest magnitude, and a negative one would flip the signs
    of the block's moments without a trace."""
    if not name.endswith("_absmax") or not negatives:
        return None
    return (f"state {name!r} holds {negatives} negative value(s); an absmax is its block's largest magnitude, "
            "never below zero")


def kind_for(state_dtype: str | None, size: int) -> str | None:
    """The format a param of ``size`` elements keeps its moments in: int8 only from ``MIN_SIZE``."""
    if state_dtype == "int8" and size < MIN_SIZE:
        return None
    return state_dtype


def n_blocks(size: int) -> int:
    return -(-size // BLOCK)


def spec(kind: str, name: str, shape: tuple) -> tuple[np.dtype, tuple]:
    """``(dtype, shape)`` of lean state array ``name`` of a param of ``shape``."""
    if name.endswith("_absmax"):
        return np.dtype(np.float32), (n_blocks(int(np.prod(shape))),)
    return np.dtype(np.uint8 if kind == "int8" else np.uint16), tuple(shape)
