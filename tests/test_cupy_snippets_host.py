"""The CuPy kernels without a GPU: their C snippets run on the host, their full source as PTX.

1. Every kernel body ``cupy_elementwise.operation`` (the very string CuPy is given: the element
   reads, the rule's snippet, the stores through ``opaque_index``) is pasted into a C++ loop after
   ``INDEX_SOURCE``, compiled with g++ (no fast-math, no FMA contraction, float promotion an error)
   and run through ctypes against ``gpuadam.reference`` over many steps and every flag
   combination, for every rule (Adam's, and the family's of ``tests/family_cases.py``).
2. ``cuda_source`` of each rule and dtype, with scalar and with device constants, is compiled to
   PTX with NVRTC (or nvcc) in a child process, as the house does for PTX checks: loads and stores
   per element, no float64 in the float32 kernels, no local memory, and, with ptxas, registers,
   stack and spills. Where CuPy is importable, CuPy's own generated kernel must compile to the
   same loop.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from family_cases import CASES, case_id, describe, reference_run
from helpers import FLAG_GRID, problem, ptx_from_child, ptx_instructions, reference_trajectory, trajectory_error

from gpuadam.hyper import AdamHyper
from gpuadam.kernels import cupy_elementwise as ce
from gpuadam.kernels.rules import N_CONSTANTS, RULES, SKIP, slot_names

DTYPES = {"float32": np.float32, "float64": np.float64}
CTYPES = {"float32": ("float", ctypes.c_float), "float64": ("double", ctypes.c_double)}
SIZES = [(1,), (7,), (1001,)]
STEPS = 20

# ---------------------------------------------------------------------------------------------
# 1. The snippets on the host


def _host_function(rule: str, dtype: str) -> str:
    """A C++ loop over the kernel body ``operation(rule)``, on the arrays CuPy passes."""
    arrays = [f"const T* raw_{n}" for n in ce.INPUTS[rule]] + [f"T* raw_{n}" for n in ce.OUTPUTS[rule]]
    scalars = [f"const T {n}" for _, n in ce.constant_params(rule)]
    return (
        f'extern "C" void {rule}_{dtype}(const ptrdiff_t n, {", ".join(arrays + scalars)}) {{\n'
        f"  for (ptrdiff_t i = 0; i < n; ++i) {{\n{ce.operation(rule)}  }}\n}}\n"
    )


def _host_source() -> str:
    parts = ["#include <algorithm>\n#include <cmath>\n#include <cstddef>\n"
             "using std::fabs;\nusing std::max;\nusing std::sqrt;\n", ce.INDEX_SOURCE]
    for dtype, (ctype, _) in CTYPES.items():
        # One namespace per dtype gives each its own T; the functions keep C names.
        parts.append(f"namespace {dtype} {{\ntypedef {ctype} T;\n")
        parts += [_host_function(rule, dtype) for rule in ce.SNIPPETS]
        parts.append("}\n")
    return "".join(parts)


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH: cannot compile the snippets for the host")
    tmp = tmp_path_factory.mktemp("snippets")
    src, lib = tmp / "snippets.cpp", tmp / "snippets.so"
    src.write_text(_host_source())
    # -ffp-contract=off: each operation rounds once, as written; -Wdouble-promotion -Werror: a
    # float silently widened to double (a literal, a double function) is an error.
    cmd = [gxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Wdouble-promotion", "-Werror", "-o", str(lib), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}\n{src.read_text()}"
    return ctypes.CDLL(str(lib))


def _host_kernel(lib, rule: str, dtype: str):
    fn = getattr(lib, f"{rule}_{dtype}")
    n_arrays = len(ce.INPUTS[rule]) + len(ce.OUTPUTS[rule])
    picked = [k for k, _ in ce.constant_params(rule)]  # the entries of c the snippet reads
    fn.argtypes = [ctypes.c_ssize_t] + [ctypes.c_void_p] * n_arrays + [CTYPES[dtype][1]] * len(picked)
    fn.restype = None

    def launch(arrays, c):
        """``cupy_elementwise.launch`` on the host: arrays ``(p, g, m, v[, vmax])``, constants ``c``."""
        p, g, *state = arrays
        for a in arrays:
            assert a.dtype == DTYPES[dtype] and a.flags.c_contiguous
        fn(p.size, g.ctypes.data, p.ctypes.data, *(s.ctypes.data for s in state), *(c[k] for k in picked))

    return launch


def _run_host(launch, hyper: AdamHyper, params0, grads, dtype):
    """Each tensor after ``len(grads)`` steps of the host kernel: ``(p, m, v, vmax)``."""
    out = []
    for i, p0 in enumerate(params0):
        p = p0.reshape(-1).copy()
        m, v = np.zeros_like(p), np.zeros_like(p)
        state = (m, v, np.zeros_like(p)) if hyper.amsgrad else (m, v)
        for t, step_grads in enumerate(grads, start=1):
            launch((p, step_grads[i].reshape(-1), *state), hyper.constants(t, dtype))
        out.append((p, *state, None) if not hyper.amsgrad else (p, *state))
    return out


def _flags_id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "default"


@pytest.mark.parametrize("flags", FLAG_GRID, ids=_flags_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_snippet_trajectory_matches_reference(host_lib, flags, dtype):
    hyper = AdamHyper(**flags)
    rule = "amsgrad" if hyper.amsgrad else "adam"
    launch = _host_kernel(host_lib, rule, dtype)
    params0, grads = problem(7, shapes=SIZES, dtype=DTYPES[dtype], steps=STEPS)
    got = _run_host(launch, hyper, params0, grads, DTYPES[dtype])
    ref = reference_trajectory(params0, grads, hyper)
    for (p, m, v, vmax), (rp, rm, rv, rvmax), p0 in zip(got, ref, params0):
        rp, p0 = rp.reshape(-1), p0.reshape(-1)
        moved = np.abs(rp - p0).max()
        assert moved > 0
        if dtype == "float64":
            assert np.abs(p - rp).max() <= 1e-12 * moved  # measured <= 3e-14
        else:
            # Within the float32 rounding budget of the 20-step trajectory (helpers): measured
            # <= 0.27 over 5 seeds. "Relative to how far the params moved" is no bound here: with
            # lr=1e-3 and |p| ~ 3, rounding p itself costs up to 1.4e-3 of a short move.
            assert trajectory_error(p, rp, p0, STEPS) < 1.0
        tol = 16 * np.finfo(DTYPES[dtype]).eps  # of the largest value; measured <= 4.1 eps
        assert np.abs(m - rm.reshape(-1)).max() <= tol * np.abs(rm).max()
        assert np.abs(v - rv.reshape(-1)).max() <= tol * np.abs(rv).max()
        if hyper.amsgrad:
            assert np.abs(vmax - rvmax.reshape(-1)).max() <= tol * np.abs(rvmax).max()


@pytest.mark.parametrize(
    "mistake", [{"maximize": True}, {"bias_correction": False}], ids=["wrong-sign", "no-bias-correction"]
)
def test_tolerance_catches_a_wrong_rule(host_lib, mistake):
    """The float32 bound above fails, by far, for a kernel with a flipped sign or no bias correction."""
    hyper, wrong = AdamHyper(), AdamHyper(**mistake)
    params0, grads = problem(7, shapes=SIZES, dtype=np.float32, steps=STEPS)
    got = _run_host(_host_kernel(host_lib, "adam", "float32"), wrong, params0, grads, np.float32)
    ref = reference_trajectory(params0, grads, hyper)
    for (p, *_), (rp, *_), p0 in zip(got, ref, params0):
        rp, p0 = rp.reshape(-1), p0.reshape(-1)
        assert trajectory_error(p, rp, p0, STEPS) > 100


def test_one_snippet_feeds_every_copy():
    """The ElementwiseKernel body and the inspected CUDA source contain the same snippet text."""
    for rule, snippet in ce.SNIPPETS.items():
        assert snippet in ce.operation(rule)
        for dtype in DTYPES:
            for device_constants in (False, True):
                source = ce.cuda_source(rule, dtype, device_constants)[1]
                assert snippet in "\n".join(line.strip() for line in source.splitlines())
        # No numeric literal (a digit that does not continue a name) may reach the float32 code.
        code = re.sub(r"/\*.*?\*/", "", snippet)
        assert not re.search(r"(?<!\w)\d", code), code


def test_every_rule_names_its_constants_tuple():
    """Each rule's names follow its constants function's layout (N_CONSTANTS entries, ``skip``
    last), and the snippet reads every scalar it takes as a parameter."""
    for rule, snippet in ce.SNIPPETS.items():
        names = slot_names(RULES[rule].layout)
        assert len(names) == N_CONSTANTS and names[SKIP] == "skip", rule
        words = set(re.findall(r"[A-Za-z_]\w*", re.sub(r"/\*.*?\*/", "", snippet)))
        for _, name in ce.constant_params(rule):
            assert name in words, (rule, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_family_snippet_trajectory_matches_reference(host_lib, case, dtype):
    """Every rule of the family, every flag: the snippet's trajectory and state on the reference's."""
    name, kw = case
    hyper, rule, names, init = describe(name, kw)
    launch = _host_kernel(host_lib, rule, dtype)
    params0, grads = problem(7, shapes=SIZES, dtype=DTYPES[dtype], steps=STEPS)
    eps = np.finfo(DTYPES[dtype]).eps
    for i, (p0, (rp, rstate)) in enumerate(zip(params0, reference_run(name, hyper, params0, grads))):
        p = p0.reshape(-1).copy()
        state = [np.full_like(p, init.get(n, 0.0)) for n in names]  # the optimizer's order and start
        for t, step_grads in enumerate(grads, start=1):
            launch((p, step_grads[i].reshape(-1), *state), hyper.constants(t, DTYPES[dtype]))
        rp, p0 = rp.reshape(-1), p0.reshape(-1)
        moved = np.abs(rp - p0).max()
        assert moved > 0
        if dtype == "float64":
            assert np.abs(p - rp).max() <= 1e-12 * max(moved, 1e-3)
        else:
            assert trajectory_error(p, rp, p0, STEPS) < 1.0
        for n, s in zip(names, state):
            r = rstate[n].reshape(-1)
            assert np.abs(s - r).max() <= STEPS * 4 * eps * np.abs(r).max(), n


def test_imports_and_builds_source_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "from gpuadam.kernels import cupy_elementwise as ce\n"
        "name, src = ce.cuda_source('amsgrad', 'float32')\n"
        "assert name in src and ce.SNIPPETS['amsgrad'].splitlines()[0] in src\n"
        "try:\n    ce.elementwise_kernel('adam')\nexcept ImportError:\n    print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------------------------------------
# 2. The full CUDA source as PTX (compiled in a child process)

ARCH = "sm_90"

VARIANTS = ["", "/device-constants"]

_COMPILE = """
import json, sys
from gpuadam import machine_code as mc
from gpuadam.kernels import cupy_elementwise as ce
out = {}
for rule in ce.SNIPPETS:
    for variant in VARIANTS:
        kernel = rule + variant
        for dtype in ("float32", "float64"):
            out[f"{kernel}-{dtype}"] = mc.cupy_ptx(kernel, dtype, ARCH)
            try:
                import cupy  # noqa: F401  (CuPy's own generator needs CuPy, not a GPU)
            except Exception:
                continue
            for bits in (32, 64):
                name, src, options = ce.cupy_generated_source(kernel, dtype, index_32_bits=bits == 32)
                out[f"{kernel}-{dtype}-cupy{bits}"] = mc.compile_source_ptx(src, name, ARCH, options)
json.dump(out, sys.stdout)
""".replace("ARCH", repr(ARCH)).replace("VARIANTS", repr(VARIANTS))


@pytest.fixture(scope="module")
def ptx():
    return ptx_from_child(_COMPILE)



def _loop_bodies(text: str) -> list[list[str]]:
    """The instructions of each loop: from a label to the backward branch to it."""
    labels = {m.group(1): m.end() for m in re.finditer(r"^(\$L__\w+):", text, re.M)}
    return [ptx_instructions(text[labels[b.group(1)] : b.start()])
            for b in re.finditer(r"\bbra(?:\.uni)?\s+(\$L__\w+);", text)
            if labels.get(b.group(1), b.start()) < b.start()]


def _loop_traffic(text: str) -> list[tuple[int, int]]:
    """``(global loads, global stores)`` of each loop."""
    return [(sum(i.startswith("ld.global") for i in body), sum(i.startswith("st.global") for i in body))
            for body in _loop_bodies(text)]


def _loop(text: str) -> str:
    """The PTX of the grid-stride loop (from the no-unroll pragma on), register numbers erased."""
    return re.sub(r"%(\w+?)\d+", r"%\1", text[text.index('.pragma "nounroll"'):])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", list(ce.SNIPPETS))
def test_ptx_traffic_and_precision(ptx, rule, variant, dtype):
    text = ptx[f"{rule}{variant}-{dtype}"]
    name = ce.kernel_name(rule, bool(variant))
    assert re.findall(r"\.entry\s+(\w+)", text) == [name]
    code = ptx_instructions(text)
    loads = [i for i in code if i.startswith("ld.global")]
    stores = [i for i in code if i.startswith("st.global")]
    # Each element read once and written once: Adam 4 loads : 3 stores, AMSGrad 5 : 4. A flag the
    # loop does not change (SGD's nesterov, RAdam's rectification) may be hoisted out of it, the
    # loop then copied once per value: each copy moves one element's bytes, and nothing else does
    # but the device constants, read once before the loop.
    per_element = (len(ce.INPUTS[rule]) + len(ce.OUTPUTS[rule]), len(ce.OUTPUTS[rule]))
    constants = len(ce.constant_params(rule)) if variant else 0
    loops = _loop_traffic(text)
    assert loops and all(traffic == per_element for traffic in loops), (loops, per_element)
    assert (len(loads), len(stores)) == (len(loops) * per_element[0] + constants, len(loops) * per_element[1])
    assert len(loops) <= 2
    assert not [i for i in code if re.match(r"(ld|st)\.local", i)]
    if dtype == "float32":
        f64 = [i for i in code if re.search(r"\.f64\b|cvt\.f64", i)]
        assert not f64, f"float64 arithmetic in the float32 kernel: {f64}"


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found is None:
        try:
            from cuda.pathfinder import find_nvidia_binary_utility

            found = find_nvidia_binary_utility("ptxas")
        except Exception:
            found = None
    return found


#: Register bounds per (dtype, variant), sm_90. 32 registers let 2048 threads share an SM's 64K
#: registers: full occupancy, which every float32 kernel has, device constants included, since
#: the stores go through ``opaque_index`` (before: up to 48). float64 needs more, at most 36 with
#: scalar constants and 56 with device constants (NVRTC 13.0; before the opaque stores: 43 and 66):
#: bounds that catch a regression.
REGISTER_BOUNDS = {("float32", ""): 32, ("float32", "/device-constants"): 32,
                   ("float64", ""): 40, ("float64", "/device-constants"): 60}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", list(ce.SNIPPETS))
def test_ptxas_resources(ptx, tmp_path, rule, variant, dtype):
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas is not available")
    path = tmp_path / f"{rule}-{dtype}.ptx"
    path.write_text(ptx[f"{rule}{variant}-{dtype}"])
    proc = subprocess.run([ptxas, "-v", f"-arch={ARCH}", str(path), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    stack, spill_st, spill_ld = map(int, re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr).groups())
    assert (stack, spill_st, spill_ld) == (0, 0, 0), proc.stderr
    assert registers <= REGISTER_BOUNDS[dtype, variant], proc.stderr


def _normalized_loops(text: str) -> list[list[str]]:
    return [[re.sub(r"%(\w+?)\d+", r"%\1", re.sub(r"\$L__BB\d+_\d+", "$L", i)) for i in body]
            for body in _loop_bodies(text)]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", list(ce.SNIPPETS))
def test_cuda_source_compiles_like_cupys_own(ptx, rule, variant, dtype, bits):
    """``cuda_source`` is faithful: CuPy's generated kernel compiles to the very same loop. With
    device constants, the same loops and the same loads and stores: where a hoisted flag copies the
    loop (RAdam's), the two sources place the pointer conversions of CuPy's ``CArray`` structs in
    different blocks before the copies."""
    key = f"{rule}{variant}-{dtype}-cupy{bits}"
    if key not in ptx:
        pytest.skip("CuPy is not importable here")
    ours, cupys = ptx[f"{rule}{variant}-{dtype}"], ptx[key]
    if not variant:
        assert _loop(cupys) == _loop(ours)
        return
    assert _normalized_loops(cupys) == _normalized_loops(ours)

    def memory(text):  # opcodes: CuPy's kernel may reach a constant through an advanced pointer, ours by offset
        return sorted(i.split()[0] for i in ptx_instructions(text) if i.startswith(("ld.global", "st.global")))

    assert memory(cupys) == memory(ours)
