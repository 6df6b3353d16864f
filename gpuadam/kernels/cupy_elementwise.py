"""The update rules as CUDA C snippets, wrapped as ``cupy.ElementwiseKernel``.

This is the one other copy of ``kernels.rules`` (the house rule: one rule per language): each
snippet does exactly the operations of ``adam_moments`` then ``adam_param``, in the same order and
with the same association, on the type placeholder ``T`` so one text serves float32 and float64.
``tests/test_cupy_snippets_host.py`` compiles the very same strings with g++ and checks them against
``gpuadam.reference``, and compiles ``cuda_source`` to PTX.

The snippets read every input into a local before the first store and store each output once at
the end: the arrays are bound as plain references that the compiler cannot prove distinct, and a
store to ``m`` before ``g`` is last read would force a second load of ``g``.

The arrays are ``raw`` parameters indexed by CuPy's loop index ``i`` and bound to references by
``operation``; ``launch`` passes ``size``. With non-raw parameters CuPy indexes every array through
its strides in 32-bit arithmetic (its choice below 2**31 elements), which costs registers: for
float32 on sm_90 that AMSGrad kernel needs 38 (75% occupancy), this one 32 (full occupancy).

Nothing here imports CuPy at module level: ``SNIPPETS``, ``cuda_source`` and ``compile_ptx`` work
on a machine without CuPy or a GPU; the ``ElementwiseKernel`` objects are built at first use.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

#: Scalar parameter names in the order of the constants tuple ``c`` of ``kernels.rules`` (Adam's
#: layout; the other rules' names are ``RULE_CONSTANT_NAMES``, their parameters ``constant_params``).
CONSTANT_NAMES = (
    "grad_mul", "wd_l2", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
    "decay", "step_size", "inv_sqrt_bc2", "eps", "eps_root_bc2",
    "skip",
)

#: Per rule: the arrays only read, and the arrays read and written in place.
INPUTS = {"adam": ("g",), "amsgrad": ("g",)}
OUTPUTS = {"adam": ("p", "m", "v"), "amsgrad": ("p", "m", "v", "vmax")}

# No float literal and no double function below: with T = float every operation stays float
# (``sqrt`` and ``max`` are overloaded for float in CUDA C++, and via std:: on the host).
_MOMENTS = """\
if (skip) return;                          /* a skipped step (non-finite gradient) changes nothing */
const T gk = g * grad_mul + wd_l2 * p;                   /* adam_moments */
const T mk = beta1 * m + one_minus_beta1 * gk;
const T vk = beta2 * v + one_minus_beta2 * gk * gk;
"""

#: The CUDA C body of each rule for one element ``p, g, m, v[, vmax]``, by rule name.
SNIPPETS = {
    "adam": _MOMENTS + """\
const T denom = sqrt(vk + eps_root_bc2) * inv_sqrt_bc2 + eps;   /* adam_param */
p = p * decay - step_size * (mk / denom);
m = mk;
v = vk;
""",
    "amsgrad": _MOMENTS + """\
const T vmaxk = max(vmax, vk);
const T denom = sqrt(vmaxk + eps_root_bc2) * inv_sqrt_bc2 + eps;   /* adam_param */
p = p * decay - step_size * (mk / denom);
m = mk;
v = vk;
vmax = vmaxk;
""",
}

# The rest of the family: each snippet does exactly the operations of its rule in ``kernels.rules``.
# A rule reads its constants tuple through the names of ``RULE_CONSTANT_NAMES``, one per entry of
# the layout its constants function documents; "" marks an entry the snippet does not read, which
# is no kernel parameter. Rules not listed there read Adam's ``CONSTANT_NAMES``.

_SKIP = "if (skip) return;                          /* a skipped step (non-finite gradient) changes nothing */\n"
_SGD_GRAD = _SKIP + "const T gk = g * grad_mul + wd_l2 * p;\n"
_RMS_SQUARE = _SGD_GRAD + "const T sqk = alpha * sq + one_minus_alpha * gk * gk;    /* rmsprop_square */\n"
_RMS_CENTER = "const T gak = alpha * gavg + one_minus_alpha * gk;\n"

_ = ""
RULE_CONSTANT_NAMES = {
    "sgd": ("grad_mul", "wd_l2", "lr", _, _, _, _, _, _, _, _, "skip"),
    "sgd_momentum": ("grad_mul", "wd_l2", "lr", "keep", "take", "nesterov", "momentum", _, _, _, _, "skip"),
    "rmsprop": ("grad_mul", "wd_l2", "alpha", "one_minus_alpha", "eps", "lr", _, _, _, _, _, "skip"),
    "rmsprop_centered": ("grad_mul", "wd_l2", "alpha", "one_minus_alpha", "eps", "lr", _, _, _, _, _, "skip"),
    "rmsprop_momentum": ("grad_mul", "wd_l2", "alpha", "one_minus_alpha", "eps", "lr", "momentum",
                         _, _, _, _, "skip"),
    "rmsprop_centered_momentum": ("grad_mul", "wd_l2", "alpha", "one_minus_alpha", "eps", "lr", "momentum",
                                  _, _, _, _, "skip"),
    "adagrad": ("grad_mul", "wd_l2", "clr", "eps", _, _, _, _, _, _, _, "skip"),
    "adamax": ("grad_mul", "wd_l2", "beta1", "one_minus_beta1", "beta2", "eps", "clr", _, _, _, _, "skip"),
    "nadam": ("grad_mul", "wd_l2", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay",
              "grad_step", "inv_sqrt_bc2", "eps", "avg_step", "skip"),
    "radam": ("grad_mul", "wd_l2", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay",
              "step_size", "rect_sqrt_bc2", "eps", "adaptive", "skip"),
}
del _

INPUTS.update({rule: ("g",) for rule in RULE_CONSTANT_NAMES})
OUTPUTS.update({
    "sgd": ("p",),
    "sgd_momentum": ("p", "buf"),
    "rmsprop": ("p", "sq"),
    "rmsprop_centered": ("p", "sq", "gavg"),
    "rmsprop_momentum": ("p", "sq", "buf"),
    "rmsprop_centered_momentum": ("p", "sq", "buf", "gavg"),
    "adagrad": ("p", "acc"),
    "adamax": ("p", "m", "u"),
    "nadam": ("p", "m", "v"),
    "radam": ("p", "m", "v"),
})
SNIPPETS.update({
    "sgd": _SGD_GRAD + """\
p = p - lr * gk;
""",
    "sgd_momentum": _SGD_GRAD + """\
const T bk = keep * buf + take * gk;
const T dk = nesterov ? gk + momentum * bk : bk;          /* Nesterov's look-ahead, or the buffer */
p = p - lr * dk;
buf = bk;
""",
    "rmsprop": _RMS_SQUARE + """\
p = p - lr * (gk / (sqrt(sqk) + eps));
sq = sqk;
""",
    "rmsprop_centered": _RMS_SQUARE + _RMS_CENTER + """\
p = p - lr * (gk / (sqrt(sqk - gak * gak) + eps));
sq = sqk;
gavg = gak;
""",
    "rmsprop_momentum": _RMS_SQUARE + """\
const T bk = momentum * buf + gk / (sqrt(sqk) + eps);
p = p - lr * bk;
sq = sqk;
buf = bk;
""",
    "rmsprop_centered_momentum": _RMS_SQUARE + _RMS_CENTER + """\
const T bk = momentum * buf + gk / (sqrt(sqk - gak * gak) + eps);
p = p - lr * bk;
sq = sqk;
buf = bk;
gavg = gak;
""",
    "adagrad": _SGD_GRAD + """\
const T acck = acc + gk * gk;
p = p - clr * (gk / (sqrt(acck) + eps));
acc = acck;
""",
    "adamax": _SGD_GRAD + """\
const T mk = beta1 * m + one_minus_beta1 * gk;
const T uk = max(beta2 * u, fabs(gk) + eps);
p = p - clr * (mk / uk);
m = mk;
u = uk;
""",
    "nadam": _MOMENTS + """\
const T denom = sqrt(vk) * inv_sqrt_bc2 + eps;           /* nadam_rule */
p = p * decay - (grad_step * gk + avg_step * mk) / denom;
m = mk;
v = vk;
""",
    "radam": _MOMENTS + """\
const T pk = p * decay;                                  /* radam_rule */
p = adaptive ? pk - step_size * mk * rect_sqrt_bc2 / (sqrt(vk) + eps) : pk - step_size * mk;
m = mk;
v = vk;
""",
})


@functools.cache
def constant_params(rule: str) -> tuple[tuple[int, str], ...]:
    """``(index in the constants tuple, name)`` of each scalar parameter of ``rule``'s kernel."""
    return tuple((k, n) for k, n in enumerate(RULE_CONSTANT_NAMES.get(rule, CONSTANT_NAMES)) if n)


_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_name(rule: str, device_constants: bool = False) -> str:
    return f"gpuadam_{rule}" + ("_dc" if device_constants else "")


def operation(rule: str, device_constants: bool = False) -> str:
    """The kernel body: each array's element ``i`` bound to a reference, then ``SNIPPETS[rule]``.

    The binding is CuPy's own for non-raw parameters (``T &p = _raw_p[_ind.get()];``), with the
    contiguous index ``i`` in place of the strided one.
    """
    bind = [f"const T &{n} = raw_{n}[i];\n" for n in INPUTS[rule]]
    bind += [f"T &{n} = raw_{n}[i];\n" for n in OUTPUTS[rule]]
    return "".join(bind) + SNIPPETS[rule]


def loop_prep(rule: str, device_constants: bool) -> str:
    """Code before the element loop: with ``device_constants``, the constants read once from the
    device array ``c`` (written on the device for clipping, skipping, capturable) under the names
    the snippet uses. Inside the loop they would be re-read per element: the compiler cannot tell
    ``c`` from the arrays the loop writes."""
    return "".join(f"const T {n} = c[{k}];\n" for k, n in constant_params(rule)) if device_constants else ""


def elementwise_params(rule: str, device_constants: bool = False) -> tuple[str, str]:
    """``(in_params, out_params)`` of the rule's ElementwiseKernel: g and the constants in, state out."""
    ins = [f"raw T raw_{n}" for n in INPUTS[rule]]
    ins += ["raw T c"] if device_constants else [f"T {n}" for _, n in constant_params(rule)]
    return ", ".join(ins), ", ".join(f"raw T raw_{n}" for n in OUTPUTS[rule])


def _ctype(dtype: Any) -> str:
    try:
        return _CTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"the CuPy kernels compute in float32 or float64, not {np.dtype(dtype)}") from None


def cuda_source(rule: str, dtype: Any, device_constants: bool = False) -> tuple[str, str]:
    """``(kernel_name, source)``: the complete CUDA C++ kernel CuPy builds from ``SNIPPETS[rule]``.

    A self-contained equivalent of what ``ElementwiseKernel`` generates (``cupy_generated_source``
    gives CuPy's own text; the tests check both compile to the same PTX): the ``T`` typedef, an
    ``extern "C"`` grid-stride loop over ``ptrdiff_t i`` that is not unrolled, and ``operation``.
    Plain pointers stand in for CuPy's ``CArray`` and ``CIndexer`` structs, whose indexing of a
    contiguous array is ``data_[i]``, so the source compiles without CuPy's headers.
    """
    ctype, name = _ctype(dtype), kernel_name(rule, device_constants)
    params = [f"const T* raw_{n}" for n in INPUTS[rule]]
    params += ["const T* c"] if device_constants else [f"const T {n}" for _, n in constant_params(rule)]
    params += [f"T* raw_{n}" for n in OUTPUTS[rule]]
    prep = "".join(f"  {line}\n" for line in loop_prep(rule, device_constants).splitlines())
    body = "".join(f"    {line}\n" for line in operation(rule).splitlines())
    source = f"""typedef {ctype} T;

extern "C" __global__ void {name}({", ".join(params)}, const ptrdiff_t _n) {{
{prep}  #pragma unroll 1
  for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < _n;
       i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x) {{
{body}  }}
}}
"""
    return name, source


# ---------------------------------------------------------------------------------------------
# CuPy: the kernels themselves, and CuPy's own generated source (needs CuPy, not a GPU)

_kernels: dict[tuple, Any] = {}


def elementwise_kernel(rule: str, device_constants: bool = False) -> Any:
    """The rule's ``cupy.ElementwiseKernel``, built once; CuPy compiles it per dtype at first call."""
    kernel = _kernels.get((rule, device_constants))
    if kernel is None:
        import cupy

        ins, outs = elementwise_params(rule, device_constants)
        kernel = _kernels[rule, device_constants] = cupy.ElementwiseKernel(
            ins, outs, operation(rule), name=kernel_name(rule, device_constants), no_return=True,
            loop_prep=loop_prep(rule, device_constants),
        )
    return kernel


def launch(rule: str, arrays: tuple, c: tuple) -> None:
    """Run ``rule`` in place on 1-D CuPy arrays ``(p, g, m, v[, vmax])`` with constants ``c``.

    ``c`` holds NumPy scalars of the arrays' dtype, so ``T`` resolves to that dtype, or is a device
    array of that dtype (``on_device.DeviceSteps``). The state
    arrays are passed as the outputs, so CuPy allocates nothing and writes them in place; with
    only raw arrays CuPy takes the loop length from ``size`` (shapes were validated upstream).
    """
    p, g, *state = arrays
    if not isinstance(c, tuple):  # constants written on the device: any CUDA array of T
        import cupy

        elementwise_kernel(rule, True)(g, cupy.asarray(c), p, *state, size=p.size)
        return
    scalars = c if rule not in RULE_CONSTANT_NAMES else [c[k] for k, _ in constant_params(rule)]
    elementwise_kernel(rule)(g, *scalars, p, *state, size=p.size)


def cupy_generated_source(rule: str, dtype: Any, index_32_bits: bool = True) -> tuple[str, str, tuple]:
    """``(kernel_name, source, options)``: the kernel exactly as CuPy generates and compiles it.

    Calls CuPy's private code generator (``cupy._core._kernel``, checked with CuPy 14.2), which
    needs CuPy importable but no GPU, with the arguments ``launch`` passes: 1-D C-contiguous arrays
    and NumPy scalars. ``index_32_bits`` is CuPy's choice for arrays below 2**31 elements. The
    options are CuPy's include paths and flags plus the ``-ftz=true`` its compiler adds; the
    architecture is the caller's. Private API: the tests compare it with ``cuda_source``.
    """
    from cupy import ndarray
    from cupy._core import _carray, _kernel, core

    _ctype(dtype)
    scalar = np.dtype(dtype).type
    array_kind, indexer_kind, scalar_kind = 1, 2, 3  # _ArgKind in cupy/_core/_kernel.pyx
    array = _kernel._ArgInfo(array_kind, ndarray, scalar, 1, True, index_32_bits)
    args = (array,) * len(INPUTS[rule])
    args += (_kernel._ArgInfo(scalar_kind, scalar, scalar, 0, True, True),) * len(constant_params(rule))
    args += (array,) * len(OUTPUTS[rule])
    args += (_kernel._ArgInfo(indexer_kind, _carray.Indexer, None, 1, True, index_32_bits),)
    kernel = elementwise_kernel(rule)
    code = _kernel._get_elementwise_kernel_code(
        args, _kernel._TypeMap((("T", scalar),)), kernel.params, kernel.operation, kernel.name,
        kernel.preamble,
    )
    header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    options = tuple(core.assemble_cupy_compiler_options(())) + (FTZ_OPTION,)
    return kernel.name, header + code, options


# ---------------------------------------------------------------------------------------------
# Compilation to PTX: NVRTC from the CUDA 13.0 wheel, else nvcc

#: CuPy compiles every kernel with ``-ftz=true``; the PTX we inspect should be the PTX it runs.
FTZ_OPTION = "-ftz=true"

_NVRTC_NAMES = ("libnvrtc.so.13", "libnvrtc.so")


def _find_nvrtc() -> str | None:
    """Path of libnvrtc: the ``nvidia-cuda-nvrtc`` 13.0 wheel first, then ``cuda.pathfinder``."""
    for root in sys.path:
        for name in _NVRTC_NAMES:
            for path in glob.glob(os.path.join(root or ".", "nvidia", "cu13", "lib", name)):
                return path
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # not installed, or no NVRTC anywhere it looks
        return None


@functools.cache
def _load_nvrtc() -> Any:
    """libnvrtc as a ctypes library, or None when it cannot be found or loaded."""
    path = _find_nvrtc()
    if path is None:
        return None
    try:
        # libnvrtc dlopens its builtins by soname, and the wheel's lib directory is on no search
        # path: load them first from beside it (the loader reuses a soname already loaded).
        for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _nvrtc_ptx(lib: Any, source: str, name: str, options: list[str]) -> str:
    def check(result: int, what: str, log: str = "") -> None:
        if result != 0:
            error = lib.nvrtcGetErrorString(result).decode()
            raise RuntimeError(f"NVRTC {what} failed for {name}: {error}\n{log}".rstrip())

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        result = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        check(result, "compilation", log.value.decode(errors="replace"))
        check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvcc_ptx(nvcc: str, source: str, name: str, options: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="gpuadam-ptx-") as tmp:
        src, out = os.path.join(tmp, f"{name}.cu"), os.path.join(tmp, f"{name}.ptx")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc, "-ptx", *options, "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {name}: {' '.join(cmd)}\n{proc.stderr}".rstrip())
        with open(out) as f:
            return f.read()


def compile_source_ptx(source: str, name: str, arch: str = "sm_90", options: tuple = ()) -> str:
    """PTX of CUDA C++ ``source`` for ``arch``, with CuPy's ``-ftz=true`` and any extra ``options``.

    NVRTC (``-arch=compute_XX``: NVRTC gives PTX only for a virtual architecture) when libnvrtc
    loads, else ``nvcc -ptx -arch=sm_XX``; a RuntimeError says so when neither is available.
    """
    number = arch.split("_", 1)[-1]
    extra = [o for o in options if o != FTZ_OPTION and not o.startswith(("-arch", "--gpu-architecture"))]
    lib = _load_nvrtc()
    if lib is not None:
        return _nvrtc_ptx(lib, source, name, [f"-arch=compute_{number}", FTZ_OPTION, *extra])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return _nvcc_ptx(nvcc, source, name, [f"-arch=sm_{number}", "--ftz=true", *extra])
    raise RuntimeError(
        "cannot compile CUDA C++ to PTX: libnvrtc was not found (pip install 'nvidia-cuda-nvrtc==13.0.*') "
        "and nvcc is not on PATH"
    )


def compile_ptx(rule: str, dtype: Any, arch: str = "sm_90") -> str:
    """PTX of ``cuda_source(rule, dtype)`` for ``arch``, compiled as CuPy would (``-ftz=true``).

    ``rule`` may end in ``/device-constants``: the variant that reads its constants from memory.
    """
    base, _, variant = rule.partition("/")
    name, source = cuda_source(base, dtype, device_constants=bool(variant))
    return compile_source_ptx(source, name, arch)
