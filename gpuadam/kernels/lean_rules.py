"""Which rules have lean-state kernels, and those kernels' names.

A rule whose state is ``exp_avg`` then ``exp_avg_sq`` (Adam/AdamW, NAdam, RAdam) can keep them lean:
the signed map (or bfloat16) holds the first, the unsigned map the second; every backend derives
its lean kernels from the rule's element function (or snippet), as it does the rule's own.
"""

from __future__ import annotations

from gpuadam.kernels.rules import RULES as ALL_RULES

#: The state a rule must have, in its kernels' order, to be kept lean.
MOMENTS = ("exp_avg", "exp_avg_sq")

#: The rules with lean kernels, by kernel name.
RULES = tuple(name for name, rule in ALL_RULES.items() if rule.state_names == MOMENTS)

_SUFFIX = {"int8": "int8", "bfloat16": "bf16state"}


def kernel(rule: str, kind: str) -> str:
    """The name of ``rule``'s kernel with its moments in format ``kind`` (``"int8"``,
    ``"bfloat16"``): ``"adam/int8"``, ``"nadam/bf16state"``, ..."""
    return f"{rule}/{_SUFFIX[kind]}"


def kind_of(name: str) -> str | None:
    """The lean format of kernel ``name`` (``kernel``'s inverse), or None for a rule's own kernel."""
    suffix = name.rpartition("/")[2]
    return next((kind for kind, s in _SUFFIX.items() if s == suffix), None)
