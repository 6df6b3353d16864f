"""The GPU kernels compiled for real for sm_90 and held to the bar: no float64, no local memory,
no spills, <= 32 registers, and the loads/stores per element of a single pass."""

import json
import re
import subprocess
import sys

import pytest

from gpuadam import machine_code
from gpuadam.kernels import lean_rules
from gpuadam.kernels.rules import N_CONSTANTS, RULES

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


@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("kernel,loads,stores", [("adam", 4, 3), ("amsgrad", 5, 4)])
def test_device_constant_variants_keep_the_traffic_and_float32(inspected, backend, kernel, loads, stores):
    """Clipping/skip/capturable read the constants from device memory once per thread: the loop
    still moves one element's bytes, in float32, at full occupancy. Holding the loaded constants
    costs registers, and so did each array's address kept live across the rule's slow paths until
    the stores went through an opaque copy of the index (``numba_cuda.opaque_index``,
    ``cupy_elementwise.INDEX_SOURCE``): Numba's needed up to 38 (Adam 35, AMSGrad 38, NAdam 36, RAdam
    34; bounding them with __launch_bounds__ spilled), now 14-30; CuPy's 22-48, now 17-32."""
    (k,) = [k for k in inspected["kernels"]
            if (k["backend"], k["kernel"], k["dtype"]) == (backend, kernel + "/device-constants", "float32")]
    assert k["f64_ops"] == 0 and k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert k["registers"] <= 32
    assert (k["loads_per_element"], k["stores_per_element"]) == (loads, stores)


#: The lean-state kernels' loads and stores per element, host constants and device constants:
#: bfloat16 state one trip of the loop (p, g, m, v in; p, m, v out); int8 one thread per element
#: (``machine_code.NOTES``): p, g, two codes, six map lookups, two absmax (and the constants, read
#: per thread, from memory); p, two codes and, thread 0, the two absmax.
#: Every rule with lean kernels (``lean_rules.RULES``) has the same. With half params (``/master``)
#: the gradient is half bits, still one load; the half param one more store.
LEAN_TRAFFIC = {f"{rule}/{k}": v for rule in lean_rules.RULES for k, v in {
    "int8": ((12, 5), (12 + N_CONSTANTS, 5)), "bf16state": ((4, 3), (4, 3)),
    "bf16state/stochastic": ((4, 3), (4, 3))}.items()}
LEAN_TRAFFIC.update({k + "/master": (tuple((ld, st + 1) for ld, st in v)) for k, v in LEAN_TRAFFIC.items()})


@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("device_constants", [False, True], ids=["host-constants", "device-constants"])
@pytest.mark.parametrize("kernel", sorted(LEAN_TRAFFIC))
def test_lean_state_kernels_meet_the_bar(inspected, kernel, device_constants, backend):
    """int8 and bfloat16 state (``state_dtype=``), stochastic rounding's hash included: float32 math,
    nothing in local memory, full occupancy, the traffic of one pass."""
    name = kernel + (machine_code.DEVICE_CONSTANTS if device_constants else "")
    (k,) = [k for k in inspected["kernels"] if (k["backend"], k["kernel"]) == (backend, name)]
    assert k["dtype"] == "float32"
    assert k["f64_ops"] == 0 and k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert k["registers"] <= 32
    assert (k["loads_per_element"], k["stores_per_element"]) == LEAN_TRAFFIC[kernel][device_constants]
    assert bool(k["note"]) == ("/int8" in kernel)  # what "per element" means without a loop


#: A thread block's barriers, and warp-level shuffles/reductions, in PTX.
_BARRIER = re.compile(r"\b(?:bar|barrier)(?:\.cta)?\.(?:sync|red|arrive)\b")
_WARP_OP = re.compile(r"\b(?:shfl|redux)\.sync\b")


@pytest.mark.parametrize("backend,arch", [("numba-cuda", "sm_90"), ("cupy", "sm_90"), ("cupy", "sm_75")])
@pytest.mark.parametrize("device_constants", [False, True], ids=["host-constants", "device-constants"])
@pytest.mark.parametrize("master", ["", machine_code.MASTER], ids=["float32", "master"])
def test_int8_kernels_reduce_the_absmax_by_warps_behind_one_barrier(backend, arch, device_constants, master):
    """Each block's two new absmax, in one pass: every warp's maximum by shuffles (Numba; CuPy before
    sm_80) or ``redux.sync`` (CuPy on sm_80+), then the warps' through shared memory behind the one
    barrier. A shared-memory tree (nine barriers per moment, no warp op) fails here."""
    _tool_or_skip()
    kernel = "adam/int8" + master + (machine_code.DEVICE_CONSTANTS if device_constants else "")
    compile_ = machine_code.numba_lean_ptx if backend == "numba-cuda" else machine_code.cupy_lean_ptx
    ptx = compile_(kernel, "float32", arch)
    warp_ops = _WARP_OP.findall(ptx)
    assert len(_BARRIER.findall(ptx)) == 1
    assert len(warp_ops) >= 2  # at least one per moment
    assert set(warp_ops) == {"redux.sync" if (backend, arch) == ("cupy", "sm_90") else "shfl.sync"}
    r = machine_code.report(backend, kernel, "float32", arch, ptx)
    assert r.f64_ops == 0 and r.local_bytes == 0 and r.spill_bytes == 0 and r.registers <= 32


def test_float64_kernels_do_the_same_traffic(inspected):
    for k in inspected["kernels"]:
        if k["dtype"] == "float64" and k["kernel"].split("/")[0] in ("adam", "amsgrad"):
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


def _every_rule():
    return sorted(RULES.items())


@pytest.mark.parametrize("backend,suffix", [("numba-cuda", ""), ("cupy", ""), ("cupy", "/device-constants")])
@pytest.mark.parametrize("variant", ["master", "half"])
@pytest.mark.parametrize("rule,spec", _every_rule(), ids=[r for r, _ in _every_rule()])
def test_half_precision_kernels_meet_the_bar(inspected, rule, spec, variant, backend, suffix):
    """Every rule on half storage: float32 math, full occupancy, one pass. With master weights the
    kernel reads the master, g and the state and writes the master, the state and the half param.
    CuPy's half kernels fit in 32 registers with device constants too: their stores
    recompute the addresses after the math (``cupy_elementwise.INDEX_SOURCE``)."""
    n_arrays = spec.n_state + 2
    loads, stores = (n_arrays, n_arrays) if variant == "master" else (n_arrays, n_arrays - 1)
    (k,) = [k for k in inspected["kernels"] if (k["backend"], k["kernel"]) == (backend, f"{rule}/{variant}{suffix}")]
    assert k["dtype"] == "float32"
    assert k["f64_ops"] == 0 and k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert k["registers"] <= 32
    assert (k["loads_per_element"], k["stores_per_element"]) == (loads, stores)


# The rest of the family (gpuadam.optimizers): every kernel of both backends, under Adam's bar.

#: Loads and stores per element, from each rule's record: p, g and the state in; p and the state out.
FAMILY_TRAFFIC = {name: rule.traffic for name, rule in RULES.items() if name not in ("adam", "amsgrad")}


def test_family_traffic_table_covers_every_family_kernel():
    from gpuadam.kernels import cupy_elementwise, numba_cuda

    assert RULES["sgd"].traffic == (2, 1) and RULES["rmsprop_centered_momentum"].traffic == (5, 4)
    assert set(FAMILY_TRAFFIC) | {"adam", "amsgrad"} == set(numba_cuda.KERNELS) - {
        k for k in numba_cuda.KERNELS if k.endswith("/half")} == set(cupy_elementwise.SNIPPETS)
    for rule, (loads, stores) in FAMILY_TRAFFIC.items():
        assert numba_cuda.KERNELS[rule][1] == loads  # p, g and the state arrays
        assert len(cupy_elementwise.OUTPUTS[rule]) == stores and rule in cupy_elementwise.SNIPPETS


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("kernel", sorted(FAMILY_TRAFFIC))
def test_family_kernels_meet_the_bar(inspected, kernel, backend, dtype):
    (k,) = [k for k in inspected["kernels"] if (k["backend"], k["kernel"], k["dtype"]) == (backend, kernel, dtype)]
    assert k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert (k["loads_per_element"], k["stores_per_element"]) == FAMILY_TRAFFIC[kernel]
    if dtype == "float32":
        assert k["f64_ops"] == 0
        assert k["registers"] <= 32  # full occupancy on sm_90
    else:
        assert k["f64_ops"] > 0 and k["registers"] <= 48


@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("kernel", sorted(FAMILY_TRAFFIC))
def test_family_device_constant_variants_keep_the_traffic_and_float32(inspected, kernel, backend):
    (k,) = [k for k in inspected["kernels"]
            if (k["backend"], k["kernel"], k["dtype"]) == (backend, kernel + "/device-constants", "float32")]
    assert k["f64_ops"] == 0 and k["local_bytes"] == 0 and k["spill_bytes"] == 0
    assert k["registers"] <= 32  # full occupancy, as Adam's (above)
    assert (k["loads_per_element"], k["stores_per_element"]) == FAMILY_TRAFFIC[kernel]


@pytest.mark.parametrize("record", ["AdamHyper", "SGDHyper", "RMSpropHyper", "AdagradHyper", "AdamaxHyper",
                                    "NAdamHyper", "RAdamHyper"])
def test_device_side_constants_compile_for_every_family(record):
    """The one-thread preparation kernel (clipping, skipping, capturable) runs each family's constants
    function on the device: it compiles for real, with no local memory or spills."""
    _tool_or_skip()
    from gpuadam import hyper
    from gpuadam.kernels import numba_cuda

    cls = getattr(hyper, record)
    f64, i64 = types.float64, types.int64
    # sums, hyper, inv_scale, max_norm, skip_nonfinite, lr, group, steps, slot, consts32, consts64, norm,
    # skipped, last, host_step
    signature = (f64[::1], types.UniTuple(f64, len(cls().scalars())), f64, f64, f64, f64[::1], i64, i64[::1], i64,
                 types.float32[::1], f64[::1], f64[::1], i64[::1], i64, i64)
    with machine_code._no_device_needed((9, 0)):
        ptx, _ = cuda.compile_ptx(numba_cuda._make_prepare(cls.constants_fn), signature, cc=(9, 0))
    registers, spills, stack = machine_code.ptxas_resources(ptx, "sm_90")
    assert (spills, stack) == (0, 0)


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "flatbuffer"])
@pytest.mark.parametrize("dtype,fmt", [("float32", -1), ("float64", -1), ("uint16", 0)], ids=["f32", "f64", "half"])
def test_gradient_reduction_compiles_without_local_memory(dtype, fmt, masked):
    """The norm / non-finite reduction (clipping, skipping) compiles for sm_90: unscaled in the
    gradients' precision (float32 for half bits), the padding mask a uint8 load per element."""
    _tool_or_skip()
    from gpuadam.kernels import numba_cuda

    scalar = types.float64 if dtype == "float64" else types.float32
    valid = types.uint8[::1] if masked else types.float64[::1]
    signature = (getattr(types, dtype)[::1], types.float64[::1], scalar, valid)
    with machine_code._no_device_needed((9, 0)):
        ptx, _ = cuda.compile_ptx(numba_cuda._make_sumsq(getattr(numba_cuda, "float64" if dtype == "float64"
                                                                   else "float32"), fmt, masked), signature, cc=(9, 0))
    registers, spills, stack = machine_code.ptxas_resources(ptx, "sm_90")
    assert (spills, stack) == (0, 0)
    assert ("ld.global.u8" in ptx or "ld.global.nc.u8" in ptx) == masked


def test_inspect_kernels_compiles_only_the_kernels_asked_for():
    _tool_or_skip()
    reports, problems = machine_code.inspect_kernels("sm_90", kernels=["lion"])
    assert not problems
    assert sorted((r.backend, r.kernel, r.dtype) for r in reports) == [
        (b, "lion", d) for b in ("cupy", "numba-cuda") for d in ("float32", "float64")]
