"""Compile every GPU kernel for real (no GPU needed) and read its machine code.

Numba's kernels go through ``numba.cuda.compile_ptx`` (libNVVM), CuPy's CUDA source
(``cupy_elementwise.cuda_source``) through NVRTC or nvcc (``cupy_ptx``: the toolchain lives here,
with inspection; at run time CuPy compiles its kernels itself); ``ptxas -v`` then assembles each PTX
for the target and reports registers, spills and stack. From the PTX we count float64 instructions
and global loads/stores. This is how the GPU code is held to its bar on machines without a GPU
(``gpuadam inspect``): every rule's kernels and the lean-state kernels (``LEAN_KERNELS``:
``lean_cuda``'s and ``cupy_lean``'s RawKernel sources).
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import functools
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gpuadam.kernels import cupy_elementwise, lean_rules
from gpuadam.kernels.cupy_elementwise import FTZ_OPTION
from gpuadam.kernels.lowp import ROUNDING_FIELDS
from gpuadam.kernels.rules import N_CONSTANTS

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class KernelReport:
    """What the machine code of one kernel says. ``global_loads``/``global_stores`` count the whole
    kernel; ``*_per_element`` count one trip of the element loop (our loops are not unrolled)."""

    backend: str
    kernel: str
    dtype: str
    arch: str
    registers: int
    spill_bytes: int
    local_bytes: int
    f64_ops: int
    global_loads: int
    global_stores: int
    loads_per_element: int
    stores_per_element: int
    #: what the per-element counts mean where it is not one trip of an element loop (``NOTES``)
    note: str = ""

    @property
    def full_occupancy(self) -> bool:
        # sm_90: 64K registers for 2048 resident threads -> at most 32 registers per thread.
        return self.registers <= 32

    def as_dict(self) -> dict:
        return {**asdict(self), "full_occupancy": self.full_occupancy}


class ToolMissing(RuntimeError):
    """A compiler or assembler needed to inspect kernels is not installed here."""


def find_ptxas() -> str:
    """Path of ``ptxas``: on PATH, or shipped in the ``nvidia-cuda-nvcc`` wheel."""
    found = shutil.which("ptxas")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import nvidia

        for root in nvidia.__path__:
            for candidate in Path(root).glob("*/bin/ptxas"):
                return str(candidate)
    raise ToolMissing("ptxas not found: install the CUDA toolkit or the nvidia-cuda-nvcc wheel")


#: What ``gpuadam inspect`` needs beyond the base install: numba-cuda and libNVVM for Numba's kernels,
#: NVRTC and CuPy's headers for CuPy's, ptxas for both.
INSTALL_HINT = "pip install 'gpuadam[inspect]'"


def missing_requirements() -> str | None:
    """What ``gpuadam inspect`` cannot do without, in one line with the command that installs it;
    None when numba-cuda and ptxas are both here (CuPy's kernels are reported apart if they cannot be)."""
    from gpuadam.backends import numba_cuda_version

    missing = []
    if numba_cuda_version() is None:
        missing.append("numba-cuda (not installed)")
    try:
        find_ptxas()
    except ToolMissing:
        missing.append("ptxas (not on PATH, nor from the nvidia-cuda-nvcc wheel)")
    return f"needs {' and '.join(missing)}: {INSTALL_HINT}" if missing else None


_ARCH = re.compile(r"sm_(\d+)")


def ptxas_architectures(ptxas: str) -> list[str]:
    """The real architectures (``sm_XY``, no ``a``/``f`` suffix) that ``ptxas --help`` lists as
    values of ``--gpu-name``; empty when its help says nothing we can read."""
    out = subprocess.run([ptxas, "--help"], capture_output=True, text=True)
    section = re.search(r"^--gpu-name\b(.*?)^--", out.stdout, re.M | re.S)
    found = re.findall(r"'(sm_\d+)'", section.group(1)) if section else []
    return sorted(set(found), key=lambda a: int(a[3:]))


def check_arch(arch: str) -> None:
    """A ValueError, in one line, unless ``arch`` is an ``sm_XY`` that this ptxas can assemble for."""
    known = ptxas_architectures(find_ptxas())
    if _ARCH.fullmatch(arch) and (not known or arch in known):
        return
    accepted = f"one of {', '.join(known)}" if known else "sm_XY such as sm_90"
    raise ValueError(f"--arch: got {arch!r}; expected {accepted}")


_F64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z]+(?:\.[a-z0-9]+)*\.f64\b", re.M)
_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global\b", re.M)
_STORE = re.compile(r"^\s*(?:@!?%p\d+\s+)?st\.global\b", re.M)


_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def ptx_counts(ptx: str) -> tuple[int, int, int]:
    """``(f64 instructions, global loads, global stores)`` in PTX text."""
    return len(_F64.findall(ptx)), len(_LOAD.findall(ptx)), len(_STORE.findall(ptx))


def loop_traffic(ptx: str) -> tuple[int, int] | None:
    """``(global loads, global stores)`` inside the kernel's busiest loop: a label and the backward
    branch to it. This is the traffic per trip (per element when the loop is not unrolled); loads
    before the loop, such as constants read once per thread, are not in it. None without a loop."""
    labels = {m.group(1): m.end() for m in _LABEL.finditer(ptx)}
    best = None
    for branch in _BRANCH.finditer(ptx):
        start = labels.get(branch.group(1))
        if start is not None and start < branch.start():
            body = ptx[start : branch.start()]
            traffic = (len(_LOAD.findall(body)), len(_STORE.findall(body)))
            if best is None or sum(traffic) > sum(best):
                best = traffic
    return best


def ptxas_resources(ptx: str, arch: str) -> tuple[int, int, int]:
    """``(registers, spill bytes, stack bytes)`` of the single kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        out = subprocess.run(
            [find_ptxas(), "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp, "k.cubin"))],
            capture_output=True, text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{out.stderr}")
    log = out.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills, stack


#: What "per element" counts for the kernels without an element loop, by kernel (without
#: ``/device-constants``). The int8 kernel runs one thread per element and one thread block per
#: quantisation block: its counts are one thread's, so they hold per-block work too.
_INT8_NOTE = ("one thread per element, no loop: ld/elem is p, g, two codes, six map lookups and the "
              "block's two absmax (same address in all 256 threads), plus the constants with "
              "/device-constants; st/elem is p and two codes per element{} and, from thread 0 only, "
              "the two absmax per block of 256")
NOTES = {f"{rule}/int8{m}": _INT8_NOTE.format(", the half param" if m else "") for rule in lean_rules.RULES
         for m in ("", "/master")}


def report(backend: str, kernel: str, dtype: str, arch: str, ptx: str) -> KernelReport:
    registers, spills, stack = ptxas_resources(ptx, arch)
    f64, loads, stores = ptx_counts(ptx)
    note = NOTES.get(kernel.removesuffix(DEVICE_CONSTANTS), "")
    in_loop = loop_traffic(ptx)
    if note:  # one element per thread by design: the whole kernel's counts, as they are
        in_loop = (loads, stores)
    elif in_loop is None:  # no loop: one element per thread, or a loop fully unrolled by k
        unroll = math.gcd(loads, stores) or 1
        in_loop = (loads // unroll, stores // unroll)
    return KernelReport(backend, kernel, dtype, arch, registers, spills, stack, f64,
                        loads, stores, in_loop[0], in_loop[1], note)


@contextlib.contextmanager
def _no_device_needed(cc: tuple[int, int]):
    """Let Numba compile device functions with no GPU present.

    ``compile_ptx`` itself takes a compute capability, but the device functions it calls ask the
    current device for theirs; we answer for the target instead, only for this block.
    """
    import types

    import numba.cuda.dispatcher as dispatcher

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = original


#: Suffix of the kernels that read their constants from a device array (clipping, skip, capturable).
DEVICE_CONSTANTS = "/device-constants"
MASTER = "/master"


def numba_ptx(kernel: str, dtype: str, arch: str = "sm_90") -> str:
    """PTX of a Numba CUDA kernel for ``arch``, compiled with libNVVM, no GPU needed.

    ``kernel``: a name of ``numba_cuda.KERNELS``; ``NAME/device-constants``, the same kernel with
    its constants in a device array; ``NAME/master``, the half kernel ``NAME/half`` compiled for
    float32 master weights and state (float32 only, as are the half kernels).
    """
    from numba import cuda, types

    from gpuadam.kernels import numba_cuda

    name, _, variant = kernel.partition("/")
    scalar = getattr(types, dtype)
    if variant in ("half", "master"):
        func, n_arrays = numba_cuda.KERNELS[f"{name}/half"]
        half, f32 = types.uint16[::1], types.float32[::1]
        arrays = [half] * n_arrays if variant == "half" else [f32, half] + [f32] * (n_arrays - 2)
        rounding = types.UniTuple(types.int64, len(ROUNDING_FIELDS))
        signature = (*arrays, types.UniTuple(types.float32, N_CONSTANTS), rounding, half)
    else:
        func, n_arrays = numba_cuda.KERNELS[name]
        constants = scalar[::1] if variant else types.UniTuple(scalar, N_CONSTANTS)
        signature = (*([scalar[::1]] * n_arrays), constants)
    cc = (int(arch[3:-1]), int(arch[-1]))
    with _no_device_needed(cc):
        ptx, _ = cuda.compile_ptx(func, signature, cc=cc)
    return ptx


#: The lean-state kernels (``state_dtype=``) of both GPU backends, each also ``/device-constants``;
#: ``/master``: with half params, stepping their float32 masters and writing the half params.
LEAN_KERNELS = tuple(f"{rule}/{k}{m}" for rule in lean_rules.RULES
                     for k in ("int8", "bf16state", "bf16state/stochastic") for m in ("", MASTER))


def numba_lean_ptx(kernel: str, dtype: str = "float32", arch: str = "sm_90") -> str:
    """PTX of a ``lean_cuda`` kernel (``LEAN_KERNELS``, optionally ``/device-constants``) for
    ``arch``, with the argument types the numba-cuda backend launches it with (float32 params, or
    ``/master``: float32 masters, half gradients and half params)."""
    from numba import cuda, types

    from gpuadam.kernels import lean_cuda

    base = kernel.removesuffix(DEVICE_CONSTANTS)
    if base not in LEAN_KERNELS or dtype != "float32":
        raise ValueError(f"unknown lean kernel {kernel!r} ({dtype}): expected one of {', '.join(LEAN_KERNELS)}, "
                         "float32, optionally with /device-constants")
    f32, u8, u16 = types.float32[::1], types.uint8[::1], types.uint16[::1]
    constants = f32 if kernel.endswith(DEVICE_CONSTANTS) else types.UniTuple(types.float32, N_CONSTANTS)
    master = base.endswith(MASTER)
    g, half = (u16, u16) if master else (f32, types.none)
    rule, _, layout = base.partition("/")
    if layout.startswith("int8"):
        func = lean_cuda.INT8[rule]
        # p, g, codes and absmax of each moment, the constants, the signed and unsigned maps, the half format
        signature = (f32, g, u8, f32, u8, f32, constants, f32, u8, f32, f32, u8, f32, types.int32, half)
    else:
        func = lean_cuda.BF16[rule, "/stochastic" in base]
        signature = (f32, g, u16, u16, constants, types.UniTuple(types.int64, 3), types.int32, half)
    cc = (int(arch[3:-1]), int(arch[-1]))
    with _no_device_needed(cc):
        ptx, _ = cuda.compile_ptx(func, signature, cc=cc)
    return ptx


# ---------------------------------------------------------------------------------------------
# CuPy's CUDA source to PTX: NVRTC from the CUDA 13.0 wheel, else nvcc, with CuPy's FTZ_OPTION

_NVRTC_NAMES = ("libnvrtc.so.13", "libnvrtc.so")


def find_nvrtc() -> str | None:
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
def load_nvrtc() -> ctypes.CDLL | None:
    """libnvrtc as a ctypes library, or None when it cannot be found or loaded."""
    path = find_nvrtc()
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


def _nvrtc_ptx(lib: ctypes.CDLL, source: str, name: str, options: list[str]) -> str:
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
    lib = load_nvrtc()
    if lib is not None:
        return _nvrtc_ptx(lib, source, name, [f"-arch=compute_{number}", FTZ_OPTION, *extra])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return _nvcc_ptx(nvcc, source, name, [f"-arch=sm_{number}", "--ftz=true", *extra])
    raise RuntimeError(
        "cannot compile CUDA C++ to PTX: libnvrtc was not found (pip install 'nvidia-cuda-nvrtc==13.0.*') "
        "and nvcc is not on PATH"
    )


def cupy_ptx(kernel: str, dtype: str, arch: str = "sm_90") -> str:
    """PTX of ``cupy_elementwise.cuda_source`` for ``arch``, compiled as CuPy would (``-ftz=true``).

    ``kernel`` is a rule name, optionally with a half-precision layout (``/half``, ``/master``;
    float32 only) and then ``/device-constants`` (the variant that reads its constants from memory).
    """
    rule, device_constants, layout = cupy_elementwise.parse_kernel(kernel)
    name, source = cupy_elementwise.cuda_source(rule, dtype, device_constants, layout)
    return compile_source_ptx(source, name, arch)


def cupy_lean_ptx(kernel: str, dtype: str = "float32", arch: str = "sm_90") -> str:
    """PTX of a ``cupy_lean`` kernel (``LEAN_KERNELS``, optionally ``/device-constants``) for
    ``arch``: the very source the cupy backend's ``RawKernel`` compiles (with CuPy's ``-ftz=true``)."""
    from gpuadam.kernels import cupy_lean

    if dtype != "float32":
        raise ValueError(f"the lean kernels compute in float32, not {dtype}")
    name, source = cupy_lean.kernel_source(kernel)
    return compile_source_ptx(source, name, arch)


def _cupy_compiler_missing() -> str | None:
    if load_nvrtc() is None and shutil.which("nvcc") is None:
        return f"neither libnvrtc (the nvidia-cuda-nvrtc wheel) nor nvcc is here: {INSTALL_HINT}"
    return None


def kernel_matcher(patterns: Sequence[str] | None) -> Callable[[str], bool]:
    """Whether a kernel name matches any of ``patterns`` (shell globs: ``adam``, ``*int8*``,
    ``nadam/*``); every name when ``patterns`` is None."""
    if patterns is None:
        return lambda name: True
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inspect_kernels(
    arch: str = "sm_90",
    ptx_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    kernels: Sequence[str] | None = None,
) -> tuple[list, list]:
    """Reports for every GPU kernel of both backends (or those whose name matches one of the globs
    ``kernels``), and the reasons for any that could not be built.

    ``progress(done, total, label)`` is called before each kernel is compiled, and once at the end.
    """
    from gpuadam.kernels import numba_cuda

    reports, problems = [], []
    wanted = kernel_matcher(kernels)
    plain = [k for k in numba_cuda.KERNELS if "/" not in k]
    jobs = [("numba-cuda", k + v, numba_ptx, DTYPES) for k in plain for v in ("", DEVICE_CONSTANTS)]
    jobs += [("numba-cuda", k + v, numba_ptx, ("float32",)) for k in plain for v in ("/master", "/half")]
    jobs += [("numba-cuda", k + v, numba_lean_ptx, ("float32",)) for k in LEAN_KERNELS for v in ("", DEVICE_CONSTANTS)]
    try:
        missing = _cupy_compiler_missing()
        if missing is not None:
            raise ToolMissing(missing)
        jobs += [("cupy", k + v, cupy_ptx, DTYPES)
                 for k in cupy_elementwise.SNIPPETS for v in ("", DEVICE_CONSTANTS)]
        jobs += [("cupy", f"{k}/{layout}{v}", cupy_ptx, ("float32",))
                 for k in cupy_elementwise.SNIPPETS for layout in cupy_elementwise.HALF_LAYOUTS
                 for v in ("", DEVICE_CONSTANTS)]
        jobs += [("cupy", k + v, cupy_lean_ptx, ("float32",)) for k in LEAN_KERNELS for v in ("", DEVICE_CONSTANTS)]
    except Exception as exc:  # CuPy's source needs no GPU; only a broken install lands here
        problems.append(f"cupy: {exc}")
    todo = [(backend, kernel, compile_, dtype) for backend, kernel, compile_, dtypes in jobs for dtype in dtypes
            if wanted(kernel)]
    for done, (backend, kernel, compile_, dtype) in enumerate(todo):
        if progress is not None:
            progress(done, len(todo), f"{backend} {kernel} {dtype}")
        try:
            ptx = compile_(kernel, dtype, arch)
            reports.append(report(backend, kernel, dtype, arch, ptx))
        except (ToolMissing, ImportError, OSError) as exc:
            problems.append(f"{backend} {kernel} {dtype}: {exc}")
            continue
        if ptx_dir is not None:
            Path(ptx_dir).mkdir(parents=True, exist_ok=True)
            Path(ptx_dir, f"{backend}-{kernel.replace('/', '-')}-{dtype}-{arch}.ptx").write_text(ptx)
    if progress is not None:
        progress(len(todo), len(todo), "")
    return reports, problems
