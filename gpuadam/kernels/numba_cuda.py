"""Numba CUDA grid-stride kernels over the scalar rules.

Importing this module imports ``numba.cuda``, which raises on a machine without the CUDA runtime:
``gpuadam.backends`` imports it only when the backend is probed or used. The kernels are
compiled lazily, per dtype, at their first launch.
"""

from numba import cuda, uint64

from gpuadam.kernels.rules import adam_rule, amsgrad_rule

# Unsigned 64-bit indices on purpose: a signed induction variable lets LLVM prove the trip count
# and unroll the loop 4x, which holds four elements' loads in flight and pushes the float32 kernel
# past 32 registers (below full occupancy); the unsigned loop compiles to one lean body.


def adam_kernel(p, g, m, v, c):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i] = adam_rule(p[i], g[i], m[i], v[i], c)
        i += stride


def amsgrad_kernel(p, g, m, v, vmax, c):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i], vmax[i] = amsgrad_rule(p[i], g[i], m[i], v[i], vmax[i], c)
        i += stride


#: Python kernels by name, with the number of array arguments: ``gpuadam inspect`` compiles these.
KERNELS = {"adam": (adam_kernel, 4), "amsgrad": (amsgrad_kernel, 5)}

THREADS = 256
BLOCKS_PER_SM = 8  # 8 x 256 threads fill an SM at <= 32 registers; more blocks only re-stride


_compiled: dict = {}
_max_blocks: list = []


def _launcher(name):
    kernel = _compiled.get(name)
    if kernel is None:
        kernel = _compiled[name] = cuda.jit(KERNELS[name][0])
    return kernel


def _blocks(n: int) -> int:
    if not _max_blocks:
        # The simulator's device has no multiprocessor count: let it run a few blocks.
        sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 2
        _max_blocks.append(sms * BLOCKS_PER_SM)
    return max(1, min(_max_blocks[0], (n + THREADS - 1) // THREADS))


def launch(name: str, arrays: tuple, c: tuple) -> None:
    """Launch kernel ``name`` on 1-D device arrays (Numba's) with constants ``c``, asynchronously."""
    n = arrays[0].size
    _launcher(name)[_blocks(n), THREADS](*arrays, c)
