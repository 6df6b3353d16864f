"""Every rule with every flag of ``family_cases.CASES``, on each GPU backend, against the float64
reference; float64 kernels; grids that loop."""

import functools

import numpy as np
import pytest
from family_cases import CASES, case_id, describe, reference_run
from gpukit import SHAPES, SIM, STEPS, host, native, put_all
from helpers import problem, trajectory_error

import gpuadam


@functools.lru_cache(maxsize=2)
def _expected(index: int, dtype: str):
    """Problem and float64 reference of case ``index``, once for both backends (``conftest`` runs
    a case's backends one after the other)."""
    name, kw = CASES[index]
    params0, grads = problem(11 + index, shapes=SHAPES, dtype=np.dtype(dtype), steps=STEPS)
    hyper = describe(name, kw)[0]
    return params0, grads, reference_run(name, hyper, params0, grads)


def _run_and_check(index, backend, dtype):
    name, kw = CASES[index]
    params0, grads, reference = _expected(index, dtype)
    params = put_all(params0, native(backend))
    opt = getattr(gpuadam, name)(params, backend=backend, **kw)
    assert opt.backend == backend
    for g in grads:
        opt.step(put_all(g, native(backend)))
    names = describe(name, kw)[2]
    eps = np.finfo(dtype).eps
    # a state's budget is from its largest value over all tensors: a one-element tensor can cancel
    scale = {n: max(np.abs(rstate[n]).max() for _, rstate in reference) for n in names}
    for i, (p, p0, (rp, rstate), state) in enumerate(zip(params, params0, reference, opt.state)):
        got = host(p)
        assert got.shape == p0.shape
        assert np.abs(rp - p0).max() > 0, "the reference did not move: the case proves nothing"
        err = trajectory_error(got, rp, p0, STEPS)
        assert err < 1.0, f"param {i}: {err:.3g}x the rounding budget from the float64 reference"
        assert set(state) == set(names)
        for n in names:
            r = rstate[n]
            diff = np.abs(host(state[n]).reshape(p0.shape) - r).max()
            assert diff <= STEPS * 4 * eps * scale[n], f"param {i} state {n}: off by {diff:.3g}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_every_rule_and_flag_follows_the_reference(index, backend):
    _run_and_check(index, backend, "float32")


def _one_case_per_rule():
    seen, out = set(), []
    for index, (name, kw) in enumerate(CASES):
        rule = describe(name, kw)[1]
        if rule not in seen:
            seen.add(rule)
            out.append(index)
    return out


@pytest.mark.parametrize("index", _one_case_per_rule(), ids=[case_id(CASES[i]) for i in _one_case_per_rule()])
def test_float64_kernels_follow_the_reference(index, backend):
    _run_and_check(index, backend, "float64")


def test_the_big_tensor_loops_over_more_than_one_grid():
    """Numba's grid is capped (one wave of blocks per SM): the biggest tensor of these tests is
    covered only if the grid-stride loop runs more than once."""
    from gpuadam.kernels import numba_cuda

    n = max(int(np.prod(s)) for s in SHAPES)
    blocks = numba_cuda._blocks(n)
    assert blocks * numba_cuda.THREADS < n, (blocks, numba_cuda.THREADS, n)
    if not SIM:
        assert blocks > 1
