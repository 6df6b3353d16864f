"""What every rule shares: the record that declares a rule, its constants' names, the skip flag,
the constants loader and the clip/skip decision.

A rule's constants are one float tuple of ``N_CONSTANTS`` entries that its constants function
computes once per step (float64, on the host or by the device-side preparation kernel) and the
kernels receive rounded to their dtype. The names of the entries are read from the constants
function's own ``return`` (``layout_of``), so the element function reads ``c[ADAM.step_size]``,
the CUDA C snippet reads ``step_size``, and no index is written twice.
"""

from __future__ import annotations

import ast
import collections
import inspect
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from numba.extending import register_jitable

N_CONSTANTS = 12
SKIP = N_CONSTANTS - 1  # nonzero: this step is skipped (a non-finite gradient), nothing changes

#: The first line of every CUDA C snippet: a skipped step changes nothing.
SKIP_LINE = "if (skip) return;                          /* a skipped step (non-finite gradient) changes nothing */\n"


def layout_of(constants_fn: Callable) -> Any:
    """The named indices of ``constants_fn``'s tuple, read from its last ``return``: each entry a
    local name (its slot's name) or ``0.0`` (a slot the rule does not read); the last is ``0.0``,
    the skip flag, named ``skip``. A NamedTuple of ints, which Numba folds into constant indices."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(constants_fn)))
    returns = [node for node in ast.walk(tree) if isinstance(node, ast.Return)]
    entries = returns[-1].value.elts
    if len(entries) != N_CONSTANTS:
        raise ValueError(f"{constants_fn.__name__}: returns {len(entries)} constants, expected {N_CONSTANTS}")
    slots = {}
    for k, entry in enumerate(entries[:SKIP]):
        if isinstance(entry, ast.Name):
            slots[entry.id] = k
        elif not (isinstance(entry, ast.Constant) and entry.value == 0.0):
            raise ValueError(f"{constants_fn.__name__}: constant {k} must be a local's name or 0.0")
    if not (isinstance(entries[SKIP], ast.Constant) and entries[SKIP].value == 0.0):
        raise ValueError(f"{constants_fn.__name__}: the last constant is the skip flag, 0.0 from the host")
    slots["skip"] = SKIP
    name = "".join(part.title() for part in constants_fn.__name__.split("_"))
    return collections.namedtuple(name, slots)(**slots)


def slot_names(layout: Any) -> tuple[str, ...]:
    """The name of every entry of the constants tuple, "" where the rule reads none."""
    names = [""] * N_CONSTANTS
    for name, k in layout._asdict().items():
        names[k] = name
    return tuple(names)


@dataclass(frozen=True)
class Rule:
    """One update rule, declared once; every kernel, table and test row is derived from it.

    ``element(p, g, *state, c)`` returns the new ``(p, *state)`` (or ``p`` with no state), in the
    arrays' precision: compiled by Numba for the CPU loops and the CUDA kernels, plain Python in
    the simulator. ``constants`` is its per-step constants function and ``layout`` their names.
    ``state`` pairs each state array's PyTorch name with the name the kernels and the snippet
    give it, in the kernels' argument order. ``snippet`` is the CUDA C body for one element, on
    locals ``p``, ``g``, the state names and the constant names, of type ``T``: the one other copy
    of ``element``, proven equal by the tests.
    """

    name: str
    element: Callable
    constants: Callable
    layout: Any
    state: tuple[tuple[str, str], ...]
    snippet: str

    @property
    def state_names(self) -> tuple[str, ...]:
        """PyTorch's names of the state arrays, in the kernels' order."""
        return tuple(torch_name for torch_name, _ in self.state)

    @property
    def arrays(self) -> tuple[str, ...]:
        """The kernel's array names: the param, the gradient, then the state."""
        return ("p", "g", *(kernel_name for _, kernel_name in self.state))

    @property
    def n_state(self) -> int:
        return len(self.state)

    @property
    def traffic(self) -> tuple[int, int]:
        """Global loads and stores per element: every array read once, all but the gradient written once."""
        return 2 + self.n_state, 1 + self.n_state


@register_jitable
def load_constants(c):
    """``c`` as a tuple: a no-op for a tuple argument, one load per entry for a device array
    (which the compiler could not otherwise keep in registers across the stores of the loop)."""
    return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11])


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
