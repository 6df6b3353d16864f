"""FlatBuffer: one allocation, aligned views, and one launch per step for a whole model."""

import numpy as np
import pytest
from helpers import problem

import gpuadam
from gpuadam.flat import ALIGN, FlatBuffer, owner

SHAPES = [(300, 7), (1,), (33,), (4, 5, 6), (1000,)]


def test_views_are_aligned_shaped_and_share_one_buffer():
    buf = gpuadam.FlatBuffer(SHAPES)
    assert buf.data.ndim == 1 and buf.data.dtype == np.float32
    assert [v.shape for v in buf.views] == SHAPES
    for o, v in zip(buf.offsets, buf.views):
        assert o % ALIGN == 0
        assert np.shares_memory(v, buf.data)
    buf.views[2][...] = 7
    assert np.count_nonzero(buf.data == 7) == 33


def test_from_arrays_copies_and_zeros_like_keeps_layout():
    params0, _ = problem(0, shapes=SHAPES, steps=0)
    buf = gpuadam.FlatBuffer.from_arrays(params0)
    for v, p in zip(buf.views, params0):
        np.testing.assert_array_equal(v, p)
    g = buf.zeros_like()
    assert g.same_layout(buf) and not np.any(g.data)


def test_one_launch_per_step_and_same_result_as_separate_arrays():
    params0, grads = problem(3, shapes=SHAPES, steps=6)
    pbuf = gpuadam.FlatBuffer.from_arrays(params0)
    gbuf = pbuf.zeros_like()
    opt = gpuadam.Adam(pbuf.views, amsgrad=True, weight_decay=0.01)
    separate = [p.copy() for p in params0]
    ref = gpuadam.Adam(separate, amsgrad=True, weight_decay=0.01)
    for g in grads:
        for view, x in zip(gbuf.views, g):
            view[...] = x
        opt.step(gbuf.views)
        assert opt.last_step_launches == 1
        ref.step(g)
        assert ref.last_step_launches == len(SHAPES)
    for v, p in zip(pbuf.views, separate):
        np.testing.assert_array_equal(v, p)
    # padding stays zero, the state of the group is one allocation per name
    mask = np.ones(pbuf.size, bool)
    for o, v in zip(pbuf.offsets, pbuf.views):
        mask[o : o + v.size] = False
    assert not np.any(pbuf.data[mask])
    for s, t in zip(opt.state, ref.state):
        for name in s:
            np.testing.assert_array_equal(s[name], t[name])
            assert s[name].base is not None


def test_grads_not_from_a_flat_buffer_still_work_per_tensor():
    params0, grads = problem(4, shapes=SHAPES, steps=2)
    pbuf = gpuadam.FlatBuffer.from_arrays(params0)
    opt = gpuadam.Adam(pbuf.views)
    opt.step(grads[0])
    assert opt.last_step_launches == len(SHAPES)
    with pytest.raises(ValueError, match=r"grad 3: expected shape \(4, 5, 6\)"):
        opt.step(grads[1][:3] + [np.zeros(5, np.float32)] + grads[1][4:])


def test_grad_buffer_of_another_layout_is_checked_per_tensor():
    pbuf = gpuadam.FlatBuffer(SHAPES)
    other = gpuadam.FlatBuffer(SHAPES[:-1] + [(999,)])
    opt = gpuadam.Adam(pbuf.views)
    with pytest.raises(ValueError, match=r"grad 4: expected shape \(1000,\)"):
        opt.step(other.views)


def test_groups_over_two_buffers_launch_once_each():
    a = gpuadam.FlatBuffer([(10,), (20,)])
    b = gpuadam.FlatBuffer([(5, 5)], dtype=np.float64)
    a.data[...] = 1.0
    b.data[...] = 1.0
    opt = gpuadam.Adam([{"params": a.views}, {"params": b.views, "lr": 0.1}])
    ga, gb = a.zeros_like(), b.zeros_like()
    ga.data[...] = 1.0
    gb.data[...] = 1.0
    opt.step(ga.views + gb.views)
    assert opt.last_step_launches == 2
    # first step with g = 1: m_hat = v_hat = 1, so p moves by lr / (1 + eps)
    np.testing.assert_allclose(a.views[0], 1 - 1e-3 / (1 + 1e-8), rtol=1e-7)
    np.testing.assert_allclose(b.views[0], 1 - 0.1 / (1 + 1e-8), rtol=1e-15)


def test_grad_scale_divides_inside_the_kernel_and_leaves_grads_alone():
    params0, grads = problem(5, steps=4)
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    opt_a = gpuadam.Adam(a, weight_decay=0.1)
    opt_b = gpuadam.Adam(b, weight_decay=0.1)
    for g in grads:
        scaled = [x * np.float32(1024.0) for x in g]
        kept = [x.copy() for x in scaled]
        opt_a.step(scaled, grad_scale=1024.0)
        opt_b.step(g)
        for x, y in zip(scaled, kept):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # a power-of-two scale is exact
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_scale"):
            opt_a.step(grads[0], grad_scale=bad)


def test_flat_buffer_over_existing_memory_views_it_and_refuses_a_misfit():
    layout = FlatBuffer([(3, 5), 2], np.float32)
    data = np.zeros(layout.size, np.float32)
    buf = FlatBuffer([(3, 5), 2], np.float32, data=data)
    buf.views[1][...] = 4.0
    assert buf.data is data and data[16] == 4.0 and buf.views[0].shape == (3, 5)
    assert owner(buf.views) is buf  # a group over its views steps in one launch
    for bad, what in ((np.zeros(layout.size + 1, np.float32), "shape"), (np.zeros(layout.size, np.float64), "dtype"),
                      (np.zeros(2 * layout.size, np.float32)[::2], "strided"), ([0.0] * layout.size, "list")):
        with pytest.raises((TypeError, ValueError), match=f"data: expected a contiguous, writeable 1-D cpu array of "
                                                          f"{layout.size} float32.*{what}"):
            FlatBuffer([(3, 5), 2], np.float32, data=bad)
