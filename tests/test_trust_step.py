"""A step runs exactly as documented on every param, or is refused before anything changes (CPU)."""

import threading
import time

import numba
import numpy as np
import pytest

import gpuadam
from gpuadam.flat import ALIGN
from gpuadam.kernels import numba_cpu

SHAPES = [(33,), (5, 3), (1,), (40,)]


def _grads(seed, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def _params(seed=0, shapes=SHAPES):
    return _grads(seed + 100, shapes)


def _load_steps(opt, steps):
    sd = opt.state_dict()
    for i, step in enumerate(steps):
        sd["state"][i]["step"] = step
    opt.load_state_dict(sd)


# --- 1. every param its own step count, also inside one FlatBuffer launch --------------------------


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flatbuffer"])
def test_params_of_one_group_at_different_steps_each_get_their_own_bias_correction(flat):
    steps = [3, 7, 3, 1]
    warm = _grads(1)
    grads = [_grads(2 + t) for t in range(3)]
    max_norm = 0.5
    if flat:
        buf = gpuadam.FlatBuffer.from_arrays(_params())
        params, gbuf = buf.views, buf.zeros_like()
    else:
        params = _params()
    opt = gpuadam.Adam(params, lr=1e-2)
    opt.step(warm)
    _load_steps(opt, steps)
    # the oracle: one optimizer per param, at its own step, fed the clip factor as a loss scale
    alone = [_params()[i] for i in range(len(SHAPES))]
    singles = [gpuadam.Adam([a], lr=1e-2) for a in alone]
    for i, single in enumerate(singles):
        single.step([warm[i]])
        _load_steps(single, [steps[i]])
    for g in grads:
        norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
        clip = min(1.0, max_norm / (norm + 1e-6))
        if flat:
            for view, x in zip(gbuf.views, g):
                view[...] = x
            opt.step(gbuf.views, max_grad_norm=max_norm)
        else:
            opt.step(g, max_grad_norm=max_norm)
        for single, x in zip(singles, g):
            single.step([x], grad_scale=1.0 / clip)
    assert opt.steps == [s + 3 for s in steps]
    for p, a in zip(params, alone):
        np.testing.assert_allclose(p, a, rtol=2e-6, atol=1e-8)


# --- 3. a gradient that overflows once unscaled is non-finite --------------------------------------


def test_gradient_overflowing_float32_once_unscaled_is_skipped():
    p = np.ones(8, np.float32)
    opt = gpuadam.Adam([p], skip_nonfinite=True)
    g = np.full(8, 1e35, np.float32)  # finite; times 2**20 it is not
    opt.step([g], grad_scale=2.0**-20)
    assert opt.steps_skipped == 1 and opt.steps == [0]
    np.testing.assert_array_equal(p, 1.0)
    assert all(np.all(s == 0) for s in opt.state[0].values())
    opt.step([np.full(8, 1e30, np.float32)], grad_scale=2.0**-20)  # 1e36: still finite
    assert opt.steps_skipped == 1 and opt.steps == [1] and np.isfinite(p).all()


def test_norm_is_of_the_unscaled_gradients():
    p = np.zeros(2, np.float32)
    opt = gpuadam.Adam([p])
    opt.step([np.array([3.0, 4.0], np.float32) * 1024], grad_scale=1024.0, max_grad_norm=100.0)
    assert opt.last_grad_norm == pytest.approx(5.0, rel=1e-12)


# --- 4. a FlatBuffer's padding never influences a result -------------------------------------------


PADDED = [(3,), (17,), (5, 2)]  # every view ends short of a 16-element granule


@pytest.mark.parametrize("name,kw", [("Adam", {"eps": 0.0}), ("RMSprop", {"eps": 0.0}), ("Adagrad", {"eps": 0.0}),
                                     ("Adamax", {"eps": 0.0}), ("NAdam", {"eps": 0.0}), ("RAdam", {"eps": 0.0}),
                                     ("Adam", {}), ("Adagrad", {"initial_accumulator_value": 0.5})])
def test_padding_params_stay_zero_with_every_rule(name, kw):
    buf = gpuadam.FlatBuffer.from_arrays(_params(shapes=PADDED))
    gbuf = buf.zeros_like()
    opt = getattr(gpuadam, name)(buf.views, **kw)
    ref_params = _params(shapes=PADDED)
    ref = getattr(gpuadam, name)(ref_params, **kw)
    for t in range(8):  # past RAdam's switch to the rectified step
        g = _grads(10 + t, PADDED)
        for view, x in zip(gbuf.views, g):
            view[...] = x
        opt.step(gbuf.views)
        ref.step(g)
    padding = np.ones(buf.size, bool)
    for offset, view in zip(buf.offsets, buf.views):
        padding[offset : offset + view.size] = False
    np.testing.assert_array_equal(buf.data[padding], 0.0)
    for view, r in zip(buf.views, ref_params):
        np.testing.assert_array_equal(view, r)


def test_eps_zero_flat_group_steps_tensor_by_tensor_and_eps_positive_in_one_launch():
    buf = gpuadam.FlatBuffer.from_arrays(_params(shapes=PADDED))
    gbuf = buf.zeros_like()
    opt = gpuadam.Adam(buf.views, eps=0.0)
    opt.step(gbuf.views)
    assert opt.last_step_launches == len(PADDED)
    opt.param_groups[0]["eps"] = 1e-8
    opt.step(gbuf.views)
    assert opt.last_step_launches == 1


def test_junk_in_gradient_padding_changes_neither_the_norm_nor_the_skip():
    buf = gpuadam.FlatBuffer.from_arrays(_params(shapes=PADDED))
    gbuf = buf.zeros_like()
    g = _grads(3, PADDED)
    for view, x in zip(gbuf.views, g):
        view[...] = x
    gbuf.data[3:16] = np.nan  # the padding after the first view
    gbuf.data[-1] = 1e30
    opt = gpuadam.Adam(buf.views, skip_nonfinite=True)
    opt.step(gbuf.views, max_grad_norm=1e9)
    expected = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
    assert opt.steps_skipped == 0 and opt.steps == [1] * len(PADDED)
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-12)


def test_valid_counts_mark_exactly_the_views():
    buf = gpuadam.FlatBuffer([(3,), (16,), (0,), (33,)])
    valid = buf.valid_counts()
    assert ALIGN == numba_cpu.LANES and valid.size * ALIGN == buf.size
    mask = (np.arange(ALIGN)[None, :] < valid[:, None]).reshape(-1)
    expected = np.zeros(buf.size, bool)
    for offset, view in zip(buf.offsets, buf.views):
        expected[offset : offset + view.size] = True
    np.testing.assert_array_equal(mask, expected)


# --- 5. array subclasses --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_gradient_is_stepped_like_a_plain_array():
    a, b = _params(shapes=[(4,), (2, 3)])
    plain = [a.copy(), b.copy()]
    opt = gpuadam.Adam([a, b])
    ref = gpuadam.Adam(plain)
    g = _grads(4, [(4,), (2, 3)])
    opt.step([g[0], np.asmatrix(g[1])])
    ref.step(g)
    assert opt.steps == [1, 1]
    np.testing.assert_array_equal(b, plain[1])


def test_masked_gradient_is_refused_before_any_param_changes():
    a, b = _params(shapes=[(4,), (3,)])
    before = a.copy(), b.copy()
    opt = gpuadam.Adam([a, b])
    g = _grads(5, [(4,), (3,)])
    with pytest.raises(TypeError, match="grad 1: .*masked array"):
        opt.step([g[0], np.ma.masked_array(g[1], mask=[0, 1, 0])])
    assert opt.steps == [0, 0]
    np.testing.assert_array_equal(a, before[0])
    with pytest.raises(TypeError, match="param 0: .*masked array"):
        gpuadam.Adam([np.ma.masked_array(np.zeros(3, np.float32))])


# --- 6. aliasing ----------------------------------------------------------------------------------


def test_the_same_array_twice_is_refused():
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="param 1 is the same array as param 0"):
        gpuadam.Adam([p, p])
    with pytest.raises(ValueError, match="param 1 is the same array as param 0"):
        gpuadam.SGD([{"params": [p]}, {"params": [p]}])


def test_overlapping_views_are_refused_but_adjacent_ones_are_not():
    base = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="param 1 overlaps in memory with param 0"):
        gpuadam.Adam([base[:6], base[4:]])
    gpuadam.Adam([base[:5], base[5:]])


def test_gradient_aliasing_a_param_is_refused_before_anything_changes():
    p, q = _params(shapes=[(6,), (4,)])
    before = p.copy()
    opt = gpuadam.Adam([p, q])
    with pytest.raises(ValueError, match="grad 1 shares memory with param 0"):
        opt.step([np.ones(6, np.float32), p[:4]])
    assert opt.steps == [0, 0]
    np.testing.assert_array_equal(p, before)


def test_flat_gradients_that_are_the_params_buffer_are_refused():
    buf = gpuadam.FlatBuffer.from_arrays(_params(shapes=PADDED))
    opt = gpuadam.Adam(buf.views)
    with pytest.raises(ValueError, match="shares memory with param"):
        opt.step(buf.views)


def test_functional_state_aliasing_the_param_is_refused():
    p = np.ones(5, np.float32)
    v = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="exp_avg shares memory with param"):
        gpuadam.adam_step(p, np.ones(5, np.float32), p, v, step=1)
    np.testing.assert_array_equal(p, 1.0)


def test_one_flatbuffer_in_two_live_optimizers_refuses_the_one_stepped_over():
    buf = gpuadam.FlatBuffer.from_arrays(_params(shapes=PADDED))
    gbuf = buf.zeros_like()
    gbuf.data[:] = 1.0
    first = gpuadam.Adam(buf.views)
    first.step(gbuf.views)
    second = gpuadam.SGD(buf.views[1:], lr=0.1)
    second.step(gbuf.views[1:])  # the newer optimizer takes the params over
    before = buf.data.copy()
    with pytest.raises(ValueError, match="param 1 shares memory with param 0 of a SGD that has stepped it since"):
        first.step(gbuf.views)
    np.testing.assert_array_equal(buf.data, before)
    assert first.steps == [1] * len(PADDED)
    second.step(gbuf.views[1:])
    del second
    first.step(gbuf.views)  # the newer owner is gone
    assert first.steps == [2] * len(PADDED)


def test_state_loaded_into_a_new_optimizer_over_the_same_params_steps_on():
    params = _params()
    old = gpuadam.Adam(params)
    old.step(_grads(1))
    new = gpuadam.Adam(params)
    new.load_state_dict(old.state_dict())
    new.step(_grads(2))
    assert new.steps == [2] * len(SHAPES)


def test_an_optimizer_built_again_over_the_same_params_steps():
    params = _params()
    opt = gpuadam.Adam(params)
    opt.step(_grads(1))
    opt = gpuadam.Adam(params)  # the first is dropped when the name is rebound
    opt.step(_grads(2))
    assert opt.steps == [1] * len(SHAPES)


# --- 7. threads -----------------------------------------------------------------------------------


def test_one_optimizer_stepped_from_two_threads_counts_every_step(monkeypatch):
    shapes = [(1 << 10,), (3,)]
    params = _params(shapes=shapes)
    serial = [p.copy() for p in params]
    opt = gpuadam.Adam(params)
    ref = gpuadam.Adam(serial)
    launch = opt._backend.launch

    def slow_launch(*args):  # a kernel that lets the other thread in, as a long one would
        time.sleep(1e-3)
        launch(*args)

    monkeypatch.setattr(opt._backend, "launch", slow_launch)
    g = _grads(6, shapes)  # the same gradient every step: the order of the steps cannot matter
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        for _ in range(15):
            opt.step(g)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(30):
        ref.step(g)
    assert opt.steps == [30, 30]
    for p, r in zip(params, serial):
        np.testing.assert_array_equal(p, r)


def test_host_loops_release_the_gil_so_two_optimizers_run_side_by_side():
    kernel = numba_cpu.KERNELS["adam"]
    for compiled in (kernel.parallel, kernel.serial):
        assert compiled.targetoptions.get("nogil") is True


# --- 9. CPU results are bitwise the same for any thread count -------------------------------------


def test_clipped_step_is_bitwise_identical_for_one_and_two_threads():
    n = (1 << 19) + 5  # parallel loops and many reduction blocks
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    results = []
    threads = numba.get_num_threads()
    try:
        for count in sorted({1, 2, threads}):
            numba.set_num_threads(count)
            p = p0.copy()
            opt = gpuadam.Adam([p])
            opt.step([g], max_grad_norm=1.0)
            results.append((opt.last_grad_norm, p))
    finally:
        numba.set_num_threads(threads)
    for norm, p in results[1:]:
        assert norm == results[0][0]
        np.testing.assert_array_equal(p, results[0][1])
