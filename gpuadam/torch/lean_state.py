"""Lean moments (``state_dtype=``) in ``gpuadam.torch``: the torch tensors a param's state is kept in.

The names and layouts are ``gpuadam.lean``'s: ``"int8"`` keeps ``exp_avg_codes``/``exp_avg_sq_codes``
(uint8, the param's shape) and ``exp_avg_absmax``/``exp_avg_sq_absmax`` (float32, one per block);
``"bfloat16"`` keeps ``exp_avg_bf16_bits``/``exp_avg_sq_bf16_bits`` as ``torch.bfloat16`` tensors (the
kernels read their 16-bit patterns). A param under ``lean.MIN_SIZE`` elements keeps float32
``exp_avg``/``exp_avg_sq`` in int8 mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpuadam import lean

_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32,
          np.dtype(np.uint16): torch.bfloat16}

#: Each lean state name's format.
FORMAT_OF = {n: kind for kind, names in lean.NAMES.items() for n in names}


def spec(kind: str, name: str, shape: tuple) -> tuple[torch.dtype, tuple]:
    """``(torch dtype, shape)`` of lean state tensor ``name`` of a param of ``shape``."""
    dtype, state_shape = lean.spec(kind, name, tuple(shape))
    return _TORCH[dtype], state_shape


def kind_of(names: tuple[str, ...]) -> str | None:
    """The lean format of a param with state ``names`` (None: plain moments)."""
    return FORMAT_OF.get(names[0]) if names else None


def saved_format(state_dict: Any) -> str | None:
    """The ``state_dtype`` a ``state_dict()`` was saved with: ours records it; a dict without the record
    (torch's) holds lean names only if it is one of ours edited, so its names decide."""
    extra = state_dict.get("gpuadam") if isinstance(state_dict, dict) else None
    if isinstance(extra, dict) and "state_dtype" in extra:
        return lean.check_state_dtype(extra["state_dtype"])
    states = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
    for state in states.values() if isinstance(states, dict) else ():
        for n in state if isinstance(state, dict) else ():
            if n in FORMAT_OF:
                return FORMAT_OF[n]
    return None
