"""``gpuadam.distributed`` on device buffers through NCCL, with torch.distributed's NCCL
backend and with CuPy's ``NcclCommunicator``. One GPU holds one NCCL rank, so these run one rank:
they prove the device path (the collectives on device buffers, the device-side all-reduce of the
norm and the skip count) against the plain optimizer; the many-rank logic is proven on loopback
(``tests/test_distributed.py``). The NCCL tests are GPU only."""

import socket

import numpy as np
import pytest
from gpukit import host, put_all
from helpers import problem

import gpuadam
from gpuadam.distributed import ShardedOptimizer

SHAPES = [(1000,), (37, 3), (1,)]
KW = {"lr": 1e-2, "weight_decay": 0.01, "skip_nonfinite": True}


def _device_buffers(params0):
    return gpuadam.FlatBuffer.from_arrays(put_all(params0, "numba"))


def _fill(gbuf, grads):
    for v, g in zip(gbuf.views, grads):
        v.copy_to_device(np.ascontiguousarray(g))


def _compare(comm):
    params0, grads = problem(31, shapes=SHAPES, steps=3)
    grads[1][0].flat[0] = np.nan  # a skipped step: the skip count goes through the all-reduce
    plain_buf, sharded_buf = _device_buffers(params0), _device_buffers(params0)
    plain = gpuadam.Adam(plain_buf.views, **KW)
    sharded = ShardedOptimizer(gpuadam.Adam, sharded_buf, comm, **KW)
    g_plain, g_sharded = plain_buf.zeros_like(), sharded_buf.zeros_like()
    for g in grads:
        _fill(g_plain, g)
        _fill(g_sharded, g)
        plain.step(g_plain.views, max_grad_norm=1.0)
        sharded.step(g_sharded, max_grad_norm=1.0)
    assert plain.steps_skipped == 1 and sharded.optimizer.steps_skipped == 1
    np.testing.assert_array_equal(host(sharded_buf.data), host(plain_buf.data))
    assert not np.array_equal(host(plain_buf.views[0]), params0[0])


def test_one_process_on_device_buffers_is_the_plain_optimizer():
    """The same comparison without a communicator: the body the NCCL tests share, in the simulator too."""
    _compare(None)


@pytest.mark.usefixtures("real_gpu")
def test_torch_nccl_one_rank_is_the_plain_optimizer():
    import torch
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.fail("torch.distributed has no NCCL on this machine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _compare(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("real_gpu")
def test_cupy_nccl_one_rank_is_the_plain_optimizer():
    from cupy.cuda import nccl

    if not getattr(nccl, "available", False):
        pytest.fail("CuPy finds no NCCL library on this machine")
    _compare(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0))
