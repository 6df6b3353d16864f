"""float64 NumPy reference of lean state (``state_dtype=``): the tests' oracle.

The storage is undone and redone around a rule's float64 reference (``reference.adam_reference``,
``nadam_reference``, ``radam_reference``; any other state it keeps passes through): the
moments are decoded from their stored form, updated, and encoded again from the float64 values;
the param takes the unrounded moments, as the kernels' does. Encoding is written here from the
definitions (absmax per block, the nearest code by distance, round to nearest bfloat16), not from
the kernels' search tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpuadam.kernels.lean_maps import BLOCK, SIGNED, UNSIGNED
from gpuadam.lean import NAMES
from gpuadam.reference import adam_reference

MOMENTS = (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED))
INT8_NAMES, BF16_NAMES = NAMES["int8"], NAMES["bfloat16"]


def decode_int8(codes: np.ndarray, absmax: np.ndarray, table: np.ndarray) -> np.ndarray:
    """float64 values of ``codes`` (flat) with one ``absmax`` per block, as float32 products."""
    scale = np.repeat(np.asarray(absmax, np.float32), BLOCK)[: codes.size]
    return (table[codes.reshape(-1)] * scale).astype(np.float64)


def encode_int8(x: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8, absmax float32)``: per block the largest magnitude, and per element the code
    nearest ``x / absmax`` (float64 distance; the lower code on a tie)."""
    x = np.asarray(x, np.float64).reshape(-1)
    n_blocks = -(-x.size // BLOCK)
    padded = np.zeros(n_blocks * BLOCK)
    padded[: x.size] = x
    absmax = np.abs(padded.reshape(n_blocks, BLOCK)).max(axis=1).astype(np.float32)
    scale = np.repeat(absmax.astype(np.float64), BLOCK)[: x.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(scale > 0, x / scale, 0.0)
    values = table.astype(np.float64)
    upper = np.clip(np.searchsorted(values, y), 1, values.size - 1)  # values[upper-1] < y <= values[upper]
    lower = upper - 1
    nearer_upper = np.abs(values[upper] - y) < np.abs(y - values[lower])
    return np.where(nearer_upper, upper, lower).astype(np.uint8), absmax


def _others(state: dict, names: tuple) -> dict:
    """The state a rule keeps besides the moments (NAdam's ``mu_product``), passed through."""
    return {k: v for k, v in state.items() if k not in names}


def int8_reference(p: np.ndarray, g: np.ndarray, state: dict, hyper: Any, step: int,
                   reference: Callable = adam_reference) -> tuple[np.ndarray, dict, dict]:
    """One step of ``reference``'s rule on int8 state (``exp_avg_codes``, ``exp_avg_absmax``,
    ``exp_avg_sq_codes``, ``exp_avg_sq_absmax``; empty: zeros). Returns the new param, the new int8
    state, and the float64 moments before encoding (``exp_avg``, ``exp_avg_sq``)."""
    moments = _others(state, INT8_NAMES)
    for name, table in MOMENTS:
        if f"{name}_codes" in state:
            moments[name] = decode_int8(state[f"{name}_codes"], state[f"{name}_absmax"], table)
        else:
            moments[name] = np.zeros(np.size(p))
    new_p, new = reference(np.asarray(p).reshape(-1), np.asarray(g).reshape(-1), moments, hyper, step)
    out = _others(new, tuple(name for name, _ in MOMENTS))
    for name, table in MOMENTS:
        out[f"{name}_codes"], out[f"{name}_absmax"] = encode_int8(new[name], table)
    return new_p, out, {name: new[name] for name, _ in MOMENTS}


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint32).reshape(-1) << 16).view(np.float32).astype(np.float64)


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """Round float64 ``x`` to the nearest bfloat16 (ties to even), as bit patterns."""
    x = np.asarray(x, np.float64).reshape(-1)
    near = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    candidates = np.stack([near - 1, near, near + 1]) & 0xFFFF  # magnitude steps, same sign
    with np.errstate(invalid="ignore"):
        dist = np.abs(decode_bf16(candidates.reshape(-1)).reshape(3, -1) - x)
    dist = np.where(np.isnan(dist), np.inf, dist)
    # the nearest; on a tie the even pattern
    rank = np.where(dist == dist.min(axis=0), candidates & 1, 2)
    best = np.argmin(rank, axis=0)
    return candidates[best, np.arange(x.size)].astype(np.uint16)


def bf16_reference(p: np.ndarray, g: np.ndarray, state: dict, hyper: Any, step: int,
                   reference: Callable = adam_reference) -> tuple[np.ndarray, dict, dict]:
    """One step of ``reference``'s rule on bfloat16 state (``exp_avg_bf16_bits``,
    ``exp_avg_sq_bf16_bits``), rounded to nearest; returns the new param, the new state and the
    float64 moments before rounding."""
    moments = _others(state, BF16_NAMES)
    moments.update({name: decode_bf16(state[f"{name}_bf16_bits"]) if f"{name}_bf16_bits" in state
                    else np.zeros(np.size(p)) for name, _ in MOMENTS})
    new_p, new = reference(np.asarray(p).reshape(-1), np.asarray(g).reshape(-1), moments, hyper, step)
    out = _others(new, tuple(name for name, _ in MOMENTS))
    out.update({f"{name}_bf16_bits": encode_bf16(new[name]) for name, _ in MOMENTS})
    return new_p, out, {name: new[name] for name, _ in MOMENTS}
