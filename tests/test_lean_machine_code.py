"""The int8-state Adam CUDA kernel compiled for sm_90 (libNVVM, ptxas) and held to the bar of the
other kernels: no float64, no spills, no local memory, and each element's arrays read and written
once (p, g and two codes read, p and two codes written; the absmax once per block)."""

import pytest

from gpuadam import machine_code

try:
    from numba import cuda, types
except Exception as exc:  # no CUDA runtime: numba.cuda itself cannot import
    pytest.skip(f"numba.cuda cannot be imported: {exc}", allow_module_level=True)


def test_int8_kernel_machine_code():
    try:
        machine_code.find_ptxas()
    except machine_code.ToolMissing as exc:
        pytest.skip(str(exc))
    from gpuadam.kernels import lean_cuda
    from gpuadam.kernels.rules import N_CONSTANTS

    f32, u8 = types.float32[::1], types.uint8[::1]
    signature = (f32, f32, u8, f32, u8, f32, types.UniTuple(types.float32, N_CONSTANTS), f32, u8, f32, f32, u8, f32)
    with machine_code._no_device_needed((9, 0)):
        ptx, _ = cuda.compile_ptx(lean_cuda.adam_int8, signature, cc=(9, 0))
    report = machine_code.report("numba-cuda", "adam/int8", "float32", "sm_90", ptx)
    assert report.f64_ops == 0, report
    assert report.spill_bytes == 0 and report.local_bytes == 0, report
    assert report.registers <= 32, report  # as every other kernel: full occupancy
    # per element: p, g, two codes, and per table lookup (two dequantise, four for the two nearest
    # codes) plus the two absmax of the block; stores: p, two codes, two absmax
    assert report.global_stores == 5, report
    assert report.global_loads == 4 + 6 + 2, report


@pytest.mark.parametrize("device_constants", [False, True], ids=["host-constants", "device-constants"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_kernel_machine_code(stochastic, device_constants):
    try:
        machine_code.find_ptxas()
    except machine_code.ToolMissing as exc:
        pytest.skip(str(exc))
    from gpuadam.kernels import lean_cuda
    from gpuadam.kernels.rules import N_CONSTANTS

    f32, u16 = types.float32[::1], types.uint16[::1]
    constants = f32 if device_constants else types.UniTuple(types.float32, N_CONSTANTS)
    signature = (f32, f32, u16, u16, constants, types.UniTuple(types.int64, 3))
    with machine_code._no_device_needed((9, 0)):
        ptx, _ = cuda.compile_ptx(lean_cuda.ADAM_BF16[stochastic], signature, cc=(9, 0))
    report = machine_code.report("numba-cuda", "adam/bf16state", "float32", "sm_90", ptx)
    assert report.f64_ops == 0 and report.spill_bytes == 0 and report.local_bytes == 0, report
    # the hash of stochastic rounding included: stores at opaque_index, as the plain kernels
    assert report.registers <= 32, report
    # 16 bytes per element: p, g and two bfloat16 moments read; p and the moments written, one
    # element per trip of the (unsigned, not unrolled) loop
    assert (report.loads_per_element, report.stores_per_element) == (4, 3), report
