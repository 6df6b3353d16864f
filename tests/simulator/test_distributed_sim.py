"""gpuadam.distributed on device buffers, in the simulator: the shard hook on the device path (it
reduces the device's [sum of squares, non-finite count] before the clip factor and skip flag are
computed there), and a one-rank ShardedOptimizer over a FlatBuffer(device="cuda")."""

import numpy as np
from numba import cuda

import gpuadam
from gpuadam.distributed import ShardedOptimizer


def test_device_hook_reduces_the_sums_the_step_reads(small_launches):
    seen = []

    def other_slice(sums):  # what an all-reduce with a slice of sum of squares 9 would leave
        assert not isinstance(sums, np.ndarray)  # the device's own array, reduced on the device
        host = sums.copy_to_host()
        seen.append(host.copy())
        sums.copy_to_device(host + np.array([9.0, 0.0]))

    p = cuda.to_device(np.ones(8, np.float32))
    opt = gpuadam.SGD([p], lr=1.0, skip_nonfinite=True)
    assert opt.backend == "numba-cuda"
    opt.shard(0, other_slice)
    opt.step([cuda.to_device(np.full(8, 1.414213562, np.float32))], max_grad_norm=1.0)  # this slice: ~4
    assert abs(seen[0][0] - 16.0) < 1e-4 and seen[0][1] == 0
    assert abs(float(opt.last_grad_norm.copy_to_host()[0]) - 5.0) < 1e-5
    np.testing.assert_allclose(p.copy_to_host(), 1.0 - 1.414213562 / 5.0, rtol=1e-5)

    def nan_elsewhere(sums):
        sums.copy_to_device(sums.copy_to_host() + np.array([0.0, 1.0]))

    opt.shard(0, nan_elsewhere)
    before = p.copy_to_host()
    opt.step([cuda.to_device(np.ones(8, np.float32))])
    assert opt.steps_skipped == 1 and opt.steps == [1]
    np.testing.assert_array_equal(p.copy_to_host(), before)


def test_one_rank_on_device_buffers_is_the_plain_optimizer(small_launches):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (7,))]
    buf, ref = gpuadam.FlatBuffer.from_arrays([cuda.to_device(a) for a in arrays]), gpuadam.FlatBuffer.from_arrays(
        [cuda.to_device(a) for a in arrays])
    opt = ShardedOptimizer(gpuadam.Adam, buf, None, lr=1e-2, skip_nonfinite=True)
    plain = gpuadam.Adam(ref.views, lr=1e-2, skip_nonfinite=True)
    g = buf.zeros_like()
    for _ in range(2):
        g.data.copy_to_device(rng.standard_normal(buf.size).astype(np.float32))
        opt.step(g, max_grad_norm=1.0)
        plain.step(g.views, max_grad_norm=1.0)
    np.testing.assert_array_equal(buf.data.copy_to_host(), ref.data.copy_to_host())
    assert opt.optimizer.backend == "numba-cuda" and opt.steps == 2
