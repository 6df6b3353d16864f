"""Host arrays the package allocates: a FlatBuffer starts on a 64-byte cache line, and optimizer
state where its param does within a 4096-byte page (on a line beside an aligned param)."""

import numpy as np
import pytest

import gpuadam
from gpuadam.arrays import CACHE_LINE, PAGE, aligned_zeros

SIZES = [0, 1, 3, 1000, 1 << 20]  # 1 << 20 float32: 4 MiB, a fresh mmap (malloc's header before it)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.float16])
@pytest.mark.parametrize("size", SIZES)
def test_aligned_zeros(size, dtype):
    a = aligned_zeros(size, dtype)
    assert a.shape == (size,) and a.dtype == dtype
    assert size == 0 or a.ctypes.data % CACHE_LINE == 0  # an empty array's address means nothing
    assert a.flags.c_contiguous and a.flags.writeable
    assert not a.any()


def test_aligned_zeros_holds_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install 'gpuadam[half]')")
    a = aligned_zeros(1 << 20, ml_dtypes.bfloat16)
    assert a.dtype == ml_dtypes.bfloat16 and a.ctypes.data % CACHE_LINE == 0


def _page_offset(a):
    return a.ctypes.data % PAGE


@pytest.mark.parametrize("size", [1 << 20, 1000, 3])
def test_like_puts_the_array_at_its_params_offset(size):
    for shift in (0, 4, 16, 60):  # bytes past a line
        raw = np.zeros(size * 4 + 2 * PAGE, np.uint8)
        start = (-raw.ctypes.data % PAGE) + shift
        param = raw[start : start + size * 4].view(np.float32)
        a = aligned_zeros(size, np.float32, like=param)
        period = PAGE if size * 4 >= PAGE else CACHE_LINE
        assert a.ctypes.data % period == param.ctypes.data % period == shift % period


OPTIMIZERS = [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9}), ("RMSprop", {"centered": True, "momentum": 0.5})]


@pytest.mark.parametrize("name,kw", OPTIMIZERS)
def test_state_of_aligned_params_is_aligned(name, kw):
    params = [aligned_zeros(n, np.float32) for n in (1 << 20, 1000, 3)]
    assert all(p.ctypes.data % CACHE_LINE == 0 for p in params)
    opt = getattr(gpuadam, name)(params, **kw)
    arrays = [a for state in opt.state for a in state.values()]
    assert arrays and all(a.ctypes.data % CACHE_LINE == 0 for a in arrays)


@pytest.mark.parametrize("name,kw", OPTIMIZERS)
def test_state_shares_the_page_offset_of_numpy_allocated_params(name, kw):
    """NumPy's large params start 16 bytes past a line; their state starts where they do (a state
    array on a line beside them measured slower, BENCHMARKS.md)."""
    params = [np.ones(n, np.float32) for n in (1 << 20, 1 << 12)]
    opt = getattr(gpuadam, name)(params, **kw)
    for p, state in zip(params, opt.state):
        assert state and all(_page_offset(a) == _page_offset(p) for a in state.values())


def test_master_weights_and_their_state_follow_the_param():
    param = aligned_zeros(1 << 20, np.float16)
    opt = gpuadam.Adam([param], master_weights=True)
    state = opt.state[0]
    assert "master" in state
    assert all(a.ctypes.data % CACHE_LINE == 0 for a in state.values())


def test_flat_buffer_data_views_and_state_are_aligned():
    buf = gpuadam.FlatBuffer([(1 << 18,), (7,), (3, 5), (1000,)], np.float32)
    assert buf.data.ctypes.data % CACHE_LINE == 0
    assert all(v.ctypes.data % CACHE_LINE == 0 for v in buf.views)
    opt = gpuadam.Adam(buf.views)
    assert all(a.ctypes.data % CACHE_LINE == 0 for state in opt.state for a in state.values())
