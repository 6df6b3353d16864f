"""The GPU kernels compiled for real for sm_90 and held to the bar: no float64, no local memory,
no spills, <= 32 registers, and the loads/stores per element of a single pass."""

import json
import subprocess
import sys

import pytest

from gpuadam import machine_code

try:
    from numba import cuda, types
except Exception as exc:  # no CUDA runtime: numba.cuda itself cannot import
    pytest.skip(f"numba.cuda cannot be imported: {exc}", allow_module_level=True)


def _tool_or_skip():
    try:
        machine_code.find_ptxas()
    except machine_code.ToolMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def inspected():
    _tool_or_skip()
    out = subprocess.run(
        [sys.executable, "-m", "gpuadam", "inspect", "--json"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


FIELDS = {"backend", "kernel", "dtype", "arch", "registers", "spill_bytes", "local_bytes", "f64_ops",
          "global_loads", "global_stores"}


def test_report_lists_the_four_kernels_of_both_backends(inspected):
    assert inspected["problems"] == []
    got = {(k["backend"], k["kernel"], k["dtype"]) for k in inspected["kernels"]}
    for backend in ("numba-cuda", "cupy"):
        for kernel in ("adam", "amsgrad"):
            for dtype in ("float32", "float64"):
                assert (backend, kernel, dtype) in got
    for k in inspected["kernels"]:
        assert FIELDS <= set(k)
        assert k["arch"] == "sm_90"


@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("kernel,loads,stores", [("adam", 4, 3), ("amsgrad", 5, 4)])
def test_float32_kernels_meet_the_bar(inspected, backend, kernel, loads, stores):
    (k,) = [k for k in inspected["kernels"]
            if (k["backend"], k["kernel"], k["dtype"]) == (backend, kernel, "float32")]
    assert k["f64_ops"] == 0
    assert k["local_bytes"] == 0
    assert k["spill_bytes"] == 0
    assert k["registers"] <= 32
    assert k["global_loads"] * stores == k["global_stores"] * loads
    assert (k["loads_per_element"], k["stores_per_element"]) == (loads, stores)


@pytest.mark.parametrize("kernel,loads,stores", [("adam", 4, 3), ("amsgrad", 5, 4)])
def test_device_constant_variants_keep_the_traffic_and_float32(inspected, kernel, loads, stores):
    """Clipping/skip/capturable read the constants from device memory once per thread: the loop
    still moves one element's bytes, in float32; holding 12 constants costs registers (<= 40 here,
    7 of 8 blocks per SM), which a memory-bound loop does not miss."""
    (k,) = [k for k in inspected["kernels"]
            if (k["backend"], k["kernel"], k["dtype"]) == ("numba-cuda", kernel + "/device-constants", "float32")]
    assert k["f64_ops"] == 0 and k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert k["registers"] <= 40
    assert (k["loads_per_element"], k["stores_per_element"]) == (loads, stores)


def test_float64_kernels_do_the_same_traffic(inspected):
    for k in inspected["kernels"]:
        if k["dtype"] == "float64":
            assert k["f64_ops"] > 0 and k["spill_bytes"] == 0
            assert (k["loads_per_element"], k["stores_per_element"]) in {(4, 3), (5, 4)}


def test_ptx_dir_writes_each_kernel(tmp_path):
    _tool_or_skip()
    reports, problems = machine_code.inspect_kernels("sm_90", tmp_path)
    assert not problems
    assert len(list(tmp_path.glob("*.ptx"))) == len(reports) >= 12


# The checks must be able to fail: kernels with the classic mistakes are caught.

def _bad_ptx(body):
    sig = (types.float32[::1], types.float32[::1])
    with machine_code._no_device_needed((9, 0)):
        ptx, _ = cuda.compile_ptx(body, sig, cc=(9, 0))
    return machine_code.report("test", body.__name__, "float32", "sm_90", ptx)


def test_python_float_literal_is_caught_as_float64():
    _tool_or_skip()

    def literal(p, g):
        i = cuda.grid(1)
        if i < p.size:
            p[i] = p[i] - 0.001 * g[i]  # 0.001 is a float64: the math promotes

    assert _bad_ptx(literal).f64_ops > 0


def test_an_extra_store_is_caught():
    _tool_or_skip()

    def writes_grad_too(p, g):
        i = cuda.grid(1)
        if i < p.size:
            x = p[i] - g[i]
            p[i] = x
            g[i] = x  # a second store stream: 2 loads : 2 stores per element

    r = _bad_ptx(writes_grad_too)
    assert (r.loads_per_element, r.stores_per_element) == (1, 1)  # 2:2 normalises to 1:1, not 2:1


def test_counters_on_known_ptx():
    ptx = """
    ld.global.f32 %f1, [%rd1];
    @%p1 ld.global.nc.f32 %f2, [%rd2];
    st.global.f32 [%rd1], %f3;
    cvt.f64.f32 %fd1, %f1;
    add.rn.f64 %fd2, %fd1, %fd1;
    add.rn.f32 %f4, %f1, %f2;
    """
    assert machine_code.ptx_counts(ptx) == (2, 2, 1)
