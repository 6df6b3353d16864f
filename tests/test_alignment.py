"""Every host array the package allocates (optimizer state, FlatBuffer) starts on a 64-byte cache
line; NumPy's own allocation of a large array starts 16 bytes past one."""

import numpy as np
import pytest

import gpuadam
from gpuadam.arrays import CACHE_LINE, aligned_zeros

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


@pytest.mark.parametrize("name,kw", [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9}),
                                     ("RMSprop", {"centered": True, "momentum": 0.5})])
def test_optimizer_state_is_aligned(name, kw):
    params = [np.ones(n, np.float32) for n in (1 << 20, 1000, 3)]
    opt = getattr(gpuadam, name)(params, **kw)
    arrays = [a for state in opt.state for a in state.values()]
    assert arrays and all(a.ctypes.data % CACHE_LINE == 0 for a in arrays)


def test_master_weights_and_their_state_are_aligned():
    opt = gpuadam.Adam([np.ones(1 << 20, np.float16)], master_weights=True)
    state = opt.state[0]
    assert "master" in state
    assert all(a.ctypes.data % CACHE_LINE == 0 for a in state.values())


def test_flat_buffer_data_views_and_state_are_aligned():
    buf = gpuadam.FlatBuffer([(1 << 18,), (7,), (3, 5), (1000,)], np.float32)
    assert buf.data.ctypes.data % CACHE_LINE == 0
    assert all(v.ctypes.data % CACHE_LINE == 0 for v in buf.views)
    opt = gpuadam.Adam(buf.views)
    assert all(a.ctypes.data % CACHE_LINE == 0 for state in opt.state for a in state.values())
