"""GPU only: the registers and local memory the driver reports for every kernel the session loaded
equal what ``gpuadam inspect`` (``machine_code``: libNVVM or NVRTC, then ptxas) predicts for it.

Runs after every other test of the kit (``conftest`` orders it last), over the kernels they loaded.
The predictions come from the JSON of ``gpuadam inspect --json`` when ``GPUADAM_INSPECT_JSON`` names
one (``scripts/gpu_check.sh`` runs inspect first), else are computed here the same way.
"""

import json
import os

import numpy as np
import pytest

from gpuadam import machine_code
from gpuadam.kernels import cupy_elementwise, cupy_lean, numba_cuda

pytestmark = pytest.mark.usefixtures("real_gpu")

#: Kernels loaded by a run of the whole kit: fewer compared means the kit lost its coverage.
AT_LEAST = {"numba-cuda": 20, "cupy": 20}


def _arch() -> str:
    from numba import cuda

    major, minor = cuda.get_current_device().compute_capability
    return f"sm_{major}{minor}"


def _predictions(arch: str) -> dict:
    path = os.environ.get("GPUADAM_INSPECT_JSON")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    return {(k["backend"], k["kernel"], k["dtype"]): k for k in doc["kernels"] if k["arch"] == arch}


def _predict(cache: dict, backend: str, kernel: str, dtype: str, arch: str) -> tuple[int, int]:
    """``(registers, local bytes)`` inspect predicts, from its JSON or compiled now."""
    known = cache.get((backend, kernel, dtype))
    if known is None:
        lean = kernel.removesuffix(machine_code.DEVICE_CONSTANTS) in machine_code.LEAN_KERNELS
        compile_ = {(False, "numba-cuda"): machine_code.numba_ptx, (False, "cupy"): machine_code.cupy_ptx,
                    (True, "numba-cuda"): machine_code.numba_lean_ptx,
                    (True, "cupy"): machine_code.cupy_lean_ptx}[(lean, backend)]
        ptx = compile_(kernel, dtype, arch)
        known = cache[(backend, kernel, dtype)] = machine_code.report(backend, kernel, dtype, arch, ptx).as_dict()
    return known["registers"], known["local_bytes"]


def _numba_loaded():
    """``(inspect's kernel name, dtype, registers, local bytes)`` of every loaded rule kernel whose
    signature inspect compiles (not the half kernels with device constants, nor strided arrays)."""
    from numba import types

    for key, dispatcher in list(numba_cuda._compiled.items()):
        if not isinstance(key, str):  # the gradient reduction and the constants' preparation
            continue
        n_arrays = numba_cuda.KERNELS[key][1]
        for args, kernel in dispatcher.overloads.items():
            if any(isinstance(a, types.Array) and a.layout != "C" for a in args):
                continue  # inspect compiles for contiguous arrays, as every step passes them
            first, constants = args[0], args[n_arrays]
            device_constants = isinstance(constants, types.Array)
            if key.endswith("/half"):
                if device_constants:
                    continue
                name = key if first.dtype == types.uint16 else key.replace("/half", "/master")
                dtype = "float32"
            else:
                name = key + (machine_code.DEVICE_CONSTANTS if device_constants else "")
                dtype = str(first.dtype)
            yield name, dtype, kernel.regs_per_thread, kernel.local_mem_per_thread


def _numba_lean_loaded():
    """The same for the lean-state kernels (``lean_cuda``) the session loaded: float32 params, the
    constants a tuple or (``/device-constants``) a device array."""
    from numba import types

    from gpuadam.kernels import lean_cuda, lean_rules

    dispatchers = {}
    for rule in lean_rules.RULES:
        dispatchers[f"{rule}/int8"] = lean_cuda.INT8[rule], 6
        dispatchers[f"{rule}/bf16state"] = lean_cuda.BF16[rule, False], 4
        dispatchers[f"{rule}/bf16state/stochastic"] = lean_cuda.BF16[rule, True], 4
    for base, (dispatcher, constants_at) in dispatchers.items():
        for args, kernel in dispatcher.overloads.items():
            device_constants = isinstance(args[constants_at], types.Array)
            master = isinstance(args[-1], types.Array)  # the half param: half params with float32 masters
            name = base + (machine_code.MASTER if master else "") + (machine_code.DEVICE_CONSTANTS if device_constants
                                                                      else "")
            yield name, "float32", kernel.regs_per_thread, kernel.local_mem_per_thread


def _cupy_loaded():
    """``(inspect's kernel name, dtype)`` of every ElementwiseKernel the session ran, per input
    dtypes; each is then compiled from the source CuPy generates for it and loaded by the driver."""
    for (rule, device_constants, layout), k in list(cupy_elementwise._kernels.items()):
        name = rule + (f"/{layout}" if layout else "") + (machine_code.DEVICE_CONSTANTS if device_constants else "")
        try:  # cached_codes: CuPy's debugging aid, keyed by the input types (g first)
            dtypes = {"float32"} if layout else {str(np.dtype(types[0])) for types in k.cached_codes}
        except Exception:  # another CuPy: every dtype inspect reports
            dtypes = set(machine_code.DTYPES)
        for dtype in sorted(dtypes & set(machine_code.DTYPES)):
            yield name, dtype


def test_registers_and_local_memory_of_every_loaded_kernel_as_inspect_predicted():
    import cupy

    arch = _arch()
    cache = _predictions(arch)
    if not cache:
        try:
            machine_code.find_ptxas()
        except machine_code.ToolMissing as exc:
            pytest.skip(f"inspect's predictions need ptxas: {exc}")
    compared, wrong = {"numba-cuda": 0, "cupy": 0}, []
    for name, dtype, regs, local in (*_numba_loaded(), *_numba_lean_loaded()):
        want = _predict(cache, "numba-cuda", name, dtype, arch)
        compared["numba-cuda"] += 1
        if (regs, local) != want:
            wrong.append(f"numba-cuda {name} {dtype}: driver {regs} registers, {local} B local; inspect {want}")
    for name, dtype in _cupy_loaded():
        kname, source, options = cupy_elementwise.cupy_generated_source(name, dtype)
        # CuPy's compiler adds -ftz=true itself, as it does for the ElementwiseKernel
        loaded = cupy.RawKernel(source, kname, options=tuple(o for o in options if o != cupy_elementwise.FTZ_OPTION))
        got, want = (loaded.num_regs, loaded.local_size_bytes), _predict(cache, "cupy", name, dtype, arch)
        compared["cupy"] += 1
        if got != want:
            wrong.append(f"cupy {name} {dtype}: driver {got[0]} registers, {got[1]} B local; inspect {want}")
    for (base, device_constants), loaded in list(cupy_lean._kernels.items()):  # the lean RawKernels
        name = base + (machine_code.DEVICE_CONSTANTS if device_constants else "")
        got, want = (loaded.num_regs, loaded.local_size_bytes), _predict(cache, "cupy", name, "float32", arch)
        compared["cupy"] += 1
        if got != want:
            wrong.append(f"cupy {name} float32: driver {got[0]} registers, {got[1]} B local; inspect {want}")
    print(f"kernels compared with inspect's prediction: {compared}")
    assert not wrong, "\n".join(wrong)
    for backend, least in AT_LEAST.items():
        assert compared[backend] >= least, f"only {compared[backend]} {backend} kernels were loaded and compared"
