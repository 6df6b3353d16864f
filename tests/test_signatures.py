"""Every optimizer class spells out the options they all share, keyword-only, in its signature and
its docstring, so ``help()`` and editors show them (they were hidden in ``**options``)."""

import inspect

import numpy as np
import pytest

import gpuadam
from gpuadam.optim import Optimizer

CLASSES = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"]
SHARED = ["skip_nonfinite", "capturable", "master_weights", "stochastic_rounding", "seed", "half_format"]


@pytest.mark.parametrize("name", CLASSES)
def test_shared_options_are_keyword_only_parameters_with_the_base_defaults(name):
    params = inspect.signature(getattr(gpuadam, name)).parameters
    base = inspect.signature(Optimizer.__init__).parameters
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    for option in [*SHARED, "backend"]:
        assert params[option].kind == inspect.Parameter.KEYWORD_ONLY, option
        assert params[option].default == base[option].default, option


@pytest.mark.parametrize("name", CLASSES)
def test_shared_options_are_documented(name):
    doc = inspect.getdoc(getattr(gpuadam, name))
    for option in SHARED:
        assert f"``{option}``" in doc, option


@pytest.mark.parametrize("name", CLASSES)
def test_shared_options_reach_the_optimizer(name):
    opt = getattr(gpuadam, name)([np.zeros(3, np.float32)], skip_nonfinite=True, seed=7)
    assert opt.skip_nonfinite and opt.seed == 7
    with pytest.raises(TypeError, match="skip_nonfinte"):
        getattr(gpuadam, name)([np.zeros(3, np.float32)], skip_nonfinte=True)


def test_the_typed_marker_ships_with_the_package():
    """PEP 561: type checkers read the hints of an installed package only beside a py.typed marker,
    and setuptools installs it only when it is package data."""
    import re
    from pathlib import Path

    root = Path(gpuadam.__file__).parent
    assert (root / "py.typed").is_file()
    config = (root.parent / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?:^\[|\Z)", config, re.M | re.S)
    assert section and re.search(r'^gpuadam = \[.*"py\.typed".*\]', section.group(1), re.M), section
