"""Scalar update rules: plain Python, compiled by both Numba targets, each declared once as a
``Rule`` (``common.Rule``) with its constants, state names and CUDA C snippet beside it.

``register_jitable`` lets ``@njit`` loops and ``@cuda.jit`` kernels call the element functions
(and them call each other) while they stay ordinary Python for the CUDA simulator. Each takes one
element of the parameter, its gradient and its state, and the tuple ``c`` of per-step constants
that its constants function computed once (on the host, ``gpuadam.hyper``, or on the device), and
returns the new parameter and state. The constants already carry the parameter's dtype, so no
Python float literal, ``**`` or ``1 - beta`` appears in an element function: any of them would
promote float32 math to float64.

A new elementwise optimizer is a module here (its constants function, element function, snippet
and ``Rule``) named in ``_MODULES``; the loops of every backend, the CuPy kernels' parameters,
``gpuadam inspect``'s traffic bar and the tests' tables follow from ``RULES``.
"""

from gpuadam.kernels.rules import adagrad, adam, adamax, common, lion, nadam, radam, rmsprop, sgd
from gpuadam.kernels.rules.common import (
    N_CONSTANTS,
    SKIP,
    Rule,
    grad_factor,
    layout_of,
    load_constants,
    slot_names,
)

_MODULES = (adam, sgd, rmsprop, adagrad, adamax, nadam, radam, lion)

#: Every rule by kernel name.
RULES: dict[str, Rule] = {rule.name: rule for module in _MODULES for rule in module.RULES}

#: The source files the compiled loops inline: a cached loop is stale when one of them changes.
SOURCES = tuple(module.__file__ for module in (*_MODULES, common))

__all__ = ["N_CONSTANTS", "RULES", "SKIP", "SOURCES", "Rule", "grad_factor", "layout_of", "load_constants",
           "slot_names"]
