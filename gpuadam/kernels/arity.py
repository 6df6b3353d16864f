"""Loops written for a rule's arity: the Numba CPU loops and CUDA kernels take a rule's state arrays
as separate arguments, so their source is generated for each count instead of copied per count."""

from collections.abc import Callable
from typing import Any


def state_names(n_state: int) -> tuple[list[str], list[str]]:
    """``(state arrays, their new values)`` as source names for a rule with ``n_state`` state arrays."""
    return [f"s{k}" for k in range(n_state)], [f"a{k}" for k in range(n_state)]


def generated(source: str, namespace: dict[str, Any], filename: str, *args: Any) -> Callable:
    """What ``source`` (the text of ``def make(...)``) makes from ``args``, compiled in the module
    ``namespace`` under ``filename``: Numba then sees (and caches) it as a function of that module."""
    made: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace, made)
    return made["make"](*args)
