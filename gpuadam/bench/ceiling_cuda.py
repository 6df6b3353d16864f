"""Numba CUDA ceiling kernels for ``gpuadam.bench``: the loads and stores of a step, and no math.

A module of its own because importing it imports ``numba.cuda`` (``ceiling`` does so only when a
CUDA backend is benchmarked), and because Numba's simulator runs a kernel by swapping the ``cuda``
module in its globals, which a kernel defined in a closure would not see. The loop and the launch
shape are those of ``kernels.numba_cuda``, so the only difference from our kernels is the math.
"""

from numba import cuda, uint64

from gpuadam.kernels import numba_cuda
from gpuadam.kernels.lean_maps import BLOCK


def move_adam(p, g, m, v):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i] = g[i], p[i], m[i] + v[i]
        i += stride


def move_amsgrad(p, g, m, v, w):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i], w[i] = g[i], p[i], m[i] + v[i], w[i] + v[i]
        i += stride


def move_adam_master(w, g, m, v, half_param):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(w.size)
    while i < n:
        w[i], m[i], v[i], half_param[i] = m[i], w[i], m[i] + v[i], g[i]
        i += stride


def move_amsgrad_master(w, g, m, v, x, half_param):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(w.size)
    while i < n:
        w[i], m[i], v[i], x[i], half_param[i] = m[i], w[i], m[i] + v[i], x[i] + v[i], g[i]
        i += stride


def move_int8(p, g, mq, ma, vq, va):
    # one thread block per quantisation block, as lean_cuda's int8 kernel: thread 0 moves the absmax
    b = cuda.blockIdx.x
    i = b * BLOCK + cuda.threadIdx.x
    if i < p.size:
        p[i], mq[i], vq[i] = p[i] + g[i], vq[i], mq[i] + vq[i]
    if cuda.threadIdx.x == 0:
        ma[b], va[b] = va[b], ma[b] + va[b]


def move_bf16state(p, g, m, v):
    i = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    n = uint64(p.size)
    while i < n:
        p[i], m[i], v[i] = p[i] + g[i], v[i], m[i] + v[i]
        i += stride


#: By rule; ``/master``: float32 master, moments (and max) beside the 16-bit g and half param. Half state
#: runs the plain kernels on the 16-bit patterns. The lean layouts by their kernels' names (``lean.KERNEL``).
KERNELS = {"adam": move_adam, "amsgrad": move_amsgrad,
           "adam/master": move_adam_master, "amsgrad/master": move_amsgrad_master,
           "adam/int8": move_int8, "adam/bf16state": move_bf16state}
_compiled: dict = {}


def launch(rule: str, *arrays) -> None:
    """Launch the ceiling kernel of ``rule`` on 1-D device arrays, asynchronously, like ``numba_cuda.launch``."""
    kernel = _compiled.get(rule)
    if kernel is None:
        kernel = _compiled[rule] = cuda.jit(KERNELS[rule])
    if rule == "adam/int8":  # the launch shape of lean_cuda.launch
        kernel[(arrays[0].size + BLOCK - 1) // BLOCK, BLOCK](*arrays)
        return
    # numba_cuda._blocks is our kernels' own grid size: the ceiling must launch as they do.
    kernel[numba_cuda._blocks(arrays[0].size), numba_cuda.THREADS](*arrays)
