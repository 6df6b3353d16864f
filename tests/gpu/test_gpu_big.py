"""GPU only: tensors past 2**31 bytes (float32) and past 2**31 elements (bfloat16 half state), on
each backend: every element is reached, and none is written twice or out of bounds.

The values are constant, so the device checks that every element came out the same, and that
value against the CPU backend's step on a small array (to a unit in the last place: another
compiler may fuse a multiply-add)."""

import numpy as np
import pytest
from gpukit import free_device_memory, host

import gpuadam

pytestmark = pytest.mark.usefixtures("real_gpu")

KW = {"lr": 0.5, "weight_decay": 0.1}


def _expected_bits(dtype, half_format, p, g):
    """The param and state after one step from param ``p`` and grad ``g``, from the CPU backend."""
    host = [np.full(64, p, dtype)]
    ref = gpuadam.Adam(host, backend="numba-cpu", half_format=half_format, **KW)
    ref.step([np.full(64, g, dtype)])
    return host[0][0], {n: a[0] for n, a in ref.state[0].items()}


def _close(got, want, what):
    if got.dtype == np.uint16:  # bit patterns of one sign: neighbours are one unit apart
        assert abs(int(got) - int(want)) <= 1, f"{what}: {got:#06x}, the CPU's {want:#06x}"
    else:
        assert abs(got - want) <= 2 * np.spacing(abs(want)), f"{what}: {got!r}, the CPU's {want!r}"


@pytest.mark.parametrize("case", [
    ("float32", 2**29 + 2**20 + 3, np.float32, None, np.float32(1.5), np.float32(-0.25)),  # 2.2e9 bytes
    ("bfloat16", 2**31 + 2**16 + 5, np.uint16, "bfloat16", np.uint16(0x3FC0), np.uint16(0xBE80)),  # 2.1e9 elements
], ids=lambda c: c[0])
def test_a_tensor_past_2_31(backend, case):
    import cupy

    _, n, dtype, half_format, p0, g0 = case
    free_device_memory()
    g = cupy.full(n, g0, dtype)
    # a guard element past each end catches a write out of bounds: the param is a slice of one allocation
    guarded = cupy.full(n + 2, p0, dtype)
    guarded[0] = guarded[-1] = dtype(7)
    p = guarded[1:-1]
    opt = gpuadam.Adam([p], backend=backend, half_format=half_format, **KW)
    opt.step([g])
    want_p, want_state = _expected_bits(dtype, half_format, p0, g0)
    assert want_p != p0
    checks = [(p, want_p, "param")] + [(cupy.asarray(opt.state[0][name]), w, f"state {name}")
                                        for name, w in want_state.items()]
    for x, want, what in checks:
        first = x[0:1]
        differing = int(cupy.count_nonzero(x != first))
        assert differing == 0, f"{what}: {differing} of {n} elements differ from element 0"
        _close(host(first)[0], want, what)
    assert int(guarded[0]) == int(guarded[-1]) == 7, "a write past an end of the tensor"
    del p, g, guarded, opt, checks
    free_device_memory()
