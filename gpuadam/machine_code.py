"""Compile every GPU kernel for real (no GPU needed) and read its machine code.

Numba's kernels go through ``numba.cuda.compile_ptx`` (libNVVM), CuPy's CUDA source through
NVRTC or nvcc; ``ptxas -v`` then assembles each PTX for the target and reports registers, spills
and stack. From the PTX we count float64 instructions and global loads/stores. This is how the
GPU code is held to its bar on machines without a GPU (``gpuadam inspect``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

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


def report(backend: str, kernel: str, dtype: str, arch: str, ptx: str) -> KernelReport:
    registers, spills, stack = ptxas_resources(ptx, arch)
    f64, loads, stores = ptx_counts(ptx)
    in_loop = loop_traffic(ptx)
    if in_loop is None:  # no loop: one element per thread, or a loop fully unrolled by k
        unroll = math.gcd(loads, stores) or 1
        in_loop = (loads // unroll, stores // unroll)
    return KernelReport(backend, kernel, dtype, arch, registers, spills, stack, f64,
                        loads, stores, in_loop[0], in_loop[1])


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
        signature = (*arrays, types.UniTuple(types.float32, N_CONSTANTS), types.UniTuple(types.int64, 4), half)
    else:
        func, n_arrays = numba_cuda.KERNELS[name]
        constants = scalar[::1] if variant else types.UniTuple(scalar, N_CONSTANTS)
        signature = (*([scalar[::1]] * n_arrays), constants)
    cc = (int(arch[3:-1]), int(arch[-1]))
    with _no_device_needed(cc):
        ptx, _ = cuda.compile_ptx(func, signature, cc=cc)
    return ptx


def _cupy_compiler_missing() -> str | None:
    from gpuadam.kernels import cupy_elementwise

    if cupy_elementwise._load_nvrtc() is None and shutil.which("nvcc") is None:
        return f"neither libnvrtc (the nvidia-cuda-nvrtc wheel) nor nvcc is here: {INSTALL_HINT}"
    return None


def inspect_kernels(
    arch: str = "sm_90",
    ptx_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list, list]:
    """Reports for every GPU kernel of both backends, and the reasons for any that could not be built.

    ``progress(done, total, label)`` is called before each kernel is compiled, and once at the end.
    """
    from gpuadam.kernels import numba_cuda

    reports, problems = [], []
    plain = [k for k in numba_cuda.KERNELS if "/" not in k]
    jobs = [("numba-cuda", k + v, numba_ptx, DTYPES) for k in plain for v in ("", DEVICE_CONSTANTS)]
    jobs += [("numba-cuda", k + v, numba_ptx, ("float32",)) for k in plain for v in ("/master", "/half")]
    try:
        from gpuadam.kernels import cupy_elementwise

        missing = _cupy_compiler_missing()
        if missing is not None:
            raise ToolMissing(missing)
        jobs += [("cupy", k + v, cupy_elementwise.compile_ptx, DTYPES)
                 for k in cupy_elementwise.SNIPPETS for v in ("", DEVICE_CONSTANTS)]
        jobs += [("cupy", f"{k}/{layout}{v}", cupy_elementwise.compile_ptx, ("float32",))
                 for k in cupy_elementwise.SNIPPETS for layout in cupy_elementwise.HALF_LAYOUTS
                 for v in ("", DEVICE_CONSTANTS)]
    except Exception as exc:  # CuPy's source needs no GPU; only a broken install lands here
        problems.append(f"cupy: {exc}")
    todo = [(backend, kernel, compile_, dtype) for backend, kernel, compile_, dtypes in jobs for dtype in dtypes]
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
