"""Shared test helpers: random problems, the float64 reference trajectory, error bounds, PTX
compiled in a child process, C sources compiled for the host, and the compiled half-precision
conversions."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from gpuadam.hyper import AdamHyper
from gpuadam.kernels import lowp
from gpuadam.reference import adam_reference

SHAPES = [(257, 3), (1,), (1000,), (5, 7, 11)]


def problem(seed: int, shapes=SHAPES, dtype=np.float32, steps: int = 20):
    """Initial params and a list of per-step gradient lists, random (never zeros)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def reference_trajectory(params0, grads_seq, hyper: AdamHyper):
    """float64 ``(p, exp_avg, exp_avg_sq, max_exp_avg_sq or None)`` of each tensor after every step
    of ``grads_seq`` from ``params0``."""
    out = []
    for i, p in enumerate(params0):
        state = {}
        for t, grads in enumerate(grads_seq, start=1):
            p, state = adam_reference(p, grads[i], state, hyper, t)
        out.append((p, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")))
    return out


def trajectory_error(got, ref_p, p0, steps: int) -> float:
    """Error of a low-precision trajectory as a multiple of its rounding budget.

    Each step may round ``p`` (half an ulp of ``|p|``) and its update (a few ulps of the step): the
    budget is ``steps * eps * (max|p| + max|p - p0|)``. A wrong rule misses it by orders of magnitude.
    """
    eps = np.finfo(got.dtype).eps
    budget = steps * eps * (np.abs(ref_p).max() + np.abs(ref_p - p0.astype(np.float64)).max())
    return float(np.abs(got.astype(np.float64) - ref_p).max() / budget)


FLAG_GRID = [
    {},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"eps_root": 1e-6},
    {"bias_correction": False},
    {"eps": 0.0},
    {"beta1": 0.0, "beta2": 0.0},
    {"beta1": 0.99, "beta2": 0.99999, "lr": 1e-2, "amsgrad": True, "weight_decay": 0.05, "maximize": True},
]


def adam_kwargs(hyper: AdamHyper) -> dict:
    """The optimizer-constructor keywords for a hyperparameter record."""
    return dict(
        lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay,
        amsgrad=hyper.amsgrad, maximize=hyper.maximize, eps_root=hyper.eps_root,
        bias_correction=hyper.bias_correction, decoupled_weight_decay=hyper.decoupled_weight_decay,
    )


def ptx_from_child(code: str) -> dict:
    """Run ``code`` (which prints a JSON dict, typically of PTX) in a child process: the house compiles
    PTX away from the test process. Skips when neither NVRTC nor nvcc is there."""
    from gpuadam.machine_code import find_nvrtc

    if find_nvrtc() is None and shutil.which("nvcc") is None:
        pytest.skip("neither libnvrtc (nvidia-cuda-nvrtc wheel) nor nvcc is available")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ptx_instructions(text: str) -> list[str]:
    """PTX instruction lines, without comments, directives, labels or declarations."""
    lines = (line.split("//")[0].strip() for line in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith((".", "$", "{", "}", ")", "("))]


@njit
def widen_half(h, fmt, out):
    """``lowp.load_half`` over an array, compiled: half bits to float32."""
    for i in range(h.size):
        out[i] = lowp.load_half(h[i], fmt)


@njit
def narrow_half(x, fmt, out):
    """``lowp.store_half`` over an array, compiled: float32 to half bits, to nearest even."""
    for i in range(x.size):
        out[i] = lowp.store_half(x[i], fmt)


# -ffp-contract=off: each operation rounds once, as Numba's CPU loops do; -Wdouble-promotion
# -Werror: a float silently widened to double is an error. CUDA's loop pragma means nothing here.
GXX_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra",
             "-Wdouble-promotion", "-Wno-unknown-pragmas", "-Werror"]


def build_host_library(tmp_path_factory, name: str, source: str, extra_flags: tuple = ()) -> ctypes.CDLL:
    """C++ ``source`` compiled with g++ (``GXX_FLAGS``) into a shared library, loaded by ctypes."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH: cannot compile the C sources for the host")
    tmp = tmp_path_factory.mktemp(name)
    src, lib = tmp / f"{name}.cpp", tmp / f"{name}.so"
    src.write_text(source)
    cmd = [gxx, *GXX_FLAGS, *extra_flags, "-o", str(lib), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return ctypes.CDLL(str(lib))


#: CUDA's built-ins for one thread of one block, so a kernel's own text runs on the host.
ONE_THREAD = r"""
#include <cmath>
#include <cstring>
using std::isfinite; using std::sqrt; using std::pow; using std::exp; using std::expm1; using std::log;
#define __CUDACC__
#define __global__
#define __device__
#define __forceinline__
struct one_dim { unsigned x; };
static const one_dim threadIdx = {0}, blockIdx = {0}, blockDim = {1}, gridDim = {1};
template <class V> static V __shfl_down_sync(unsigned, V, int) { return V(0); }
static double atomicAdd(double* at, double v) { const double old = *at; *at += v; return old; }
"""


_C = {np.dtype(np.float64): ctypes.c_double, np.dtype(np.int64): ctypes.c_longlong,
      np.dtype(np.float32): ctypes.c_float, np.dtype(np.uint64): ctypes.c_uint64,
      np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.int32): ctypes.c_int32}


def call_with_args(kernel, args):
    """Call a host-compiled kernel with the launcher's own argument tuple."""
    types, values = [], []
    for a in args:
        if isinstance(a, np.ndarray):
            types.append(ctypes.c_void_p)
            values.append(a.ctypes.data)
        else:
            types.append(_C[np.dtype(type(a))])
            values.append(a)
    kernel.argtypes = types
    kernel(*values)
