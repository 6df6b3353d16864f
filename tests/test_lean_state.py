"""Adam/AdamW with ``state_dtype="int8"`` and ``"bfloat16"`` on the host: the fused kernels against
the float64 reference, the optimizer's bookkeeping (validation, small tensors, FlatBuffer views,
state_dict, checkpoints, state_nbytes), and bitsandbytes' Adam8bit as a witness."""

import numpy as np
import pytest

import gpuadam
from gpuadam import lean
from gpuadam import lean_reference as R
from gpuadam.hyper import AdamHyper
from gpuadam.kernels import lean_cpu
from gpuadam.kernels.lean_maps import BLOCK, SIGNED, UNSIGNED

N = 5000  # not a whole number of blocks: the last block is partial
CASES = {
    "adam": dict(lr=1e-2),
    "adamw_maximize": dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    "adam_l2_eps_root": dict(lr=1e-3, weight_decay=0.01, eps=1e-6, eps_root=1e-10),
}


def _hyper(kwargs):
    full = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                eps_root=0.0, bias_correction=True, decoupled_weight_decay=False)
    return AdamHyper.from_kwargs(**{**full, **kwargs})


def _lean_state(sd):
    return {k: v for k, v in sd["state"][0].items() if k != "step"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_steps_follow_the_reference(case):
    """From zero state, then from a mid-run state: the param to float32 accuracy, each code within
    one of the reference's (a midpoint can fall either side of float32 vs float64 moments), absmax
    to float32 accuracy."""
    rng = np.random.default_rng(3)
    p = rng.standard_normal(N).astype(np.float32)
    opt = gpuadam.Adam([p], state_dtype="int8", **CASES[case])
    hyper = _hyper(CASES[case])
    for step in range(1, 4):
        g = (rng.standard_normal(N) * 10.0 ** rng.uniform(-4, 1, N)).astype(np.float32)
        before, state = p.copy(), _lean_state(opt.state_dict())
        want_p, want, _ = R.int8_reference(before, g, state if step > 1 else {}, hyper, step)
        opt.step([g])
        got = _lean_state(opt.state_dict())
        np.testing.assert_allclose(p, want_p, rtol=2e-6, atol=1e-7 * np.abs(want_p).max())
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(got[f"{name}_absmax"], want[f"{name}_absmax"], rtol=2e-6)
            diff = np.abs(got[f"{name}_codes"].reshape(-1).astype(int) - want[f"{name}_codes"].astype(int))
            assert diff.max() <= 1 and diff.mean() < 1e-3, (name, step, diff.max(), diff.mean())


def test_int8_block_layout_and_zero_blocks():
    """One absmax per 256 elements; a block of zero gradients stays all zero (absmax 0, code of 0)."""
    p = np.ones(3 * BLOCK + 10, np.float32)
    p_small = np.ones(100, np.float32)
    g = np.zeros_like(p)
    g[BLOCK : 2 * BLOCK] = 1.0  # only block 1 moves
    opt = gpuadam.Adam([p, p_small], lr=0.1, state_dtype="int8")
    assert opt.state_format == "int8"
    opt.step([g, np.ones_like(p_small)])
    sd = opt.state_dict()["state"]
    assert sorted(sd[1]) == ["exp_avg", "exp_avg_sq", "step"]  # under 4096 elements: float32 state
    assert sd[1]["exp_avg"].dtype == np.float32
    s = sd[0]
    # 3*256+10 < 4096: float32 too; a bigger one for the layout
    assert "exp_avg" in s
    p = np.ones(16 * BLOCK + 10, np.float32)
    g = np.zeros_like(p)
    g[BLOCK : 2 * BLOCK] = 1.0
    opt = gpuadam.Adam([p], lr=0.1, state_dtype="int8")
    opt.step([g])
    s = opt.state_dict()["state"][0]
    assert s["exp_avg_absmax"].shape == (17,) and s["exp_avg_codes"].shape == p.shape
    assert np.count_nonzero(s["exp_avg_absmax"]) == 1 and s["exp_avg_absmax"][1] == np.float32(0.1)
    zero_code = int(np.nonzero(SIGNED == 0)[0][0])
    assert np.all(s["exp_avg_codes"][:BLOCK] == zero_code) and np.all(s["exp_avg_sq_codes"][:BLOCK] == 0)
    assert np.all(s["exp_avg_codes"][BLOCK : 2 * BLOCK] == 255)  # every element at the block's absmax: code 1.0
    assert np.all(p[:BLOCK] == 1.0) and np.all(p[BLOCK : 2 * BLOCK] < 1.0)


def test_bf16_steps_follow_the_reference():
    """Each stochastically rounded moment is a bfloat16 neighbour of the reference's moment (so
    within one step of its nearest); the param to float32 accuracy."""
    rng = np.random.default_rng(4)
    p = rng.standard_normal(N).astype(np.float32)
    opt = gpuadam.AdamW([p], lr=1e-2, state_dtype="bfloat16")
    hyper = _hyper(dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True))
    for step in range(1, 4):
        g = rng.standard_normal(N).astype(np.float32)
        before, state = p.copy(), _lean_state(opt.state_dict())
        want_p, want, moments = R.bf16_reference(before, g, state, hyper, step)
        opt.step([g])
        got = _lean_state(opt.state_dict())
        np.testing.assert_allclose(p, want_p, rtol=2e-6, atol=1e-7)
        for name, exact in moments.items():
            got_value = R.decode_bf16(got[f"{name}_bf16_bits"])
            ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
            # plus float32's error of the update itself, large beside a moment that cancels to ~0
            slack = 1e-6 * np.abs(exact).max()
            assert np.all(np.abs(got_value - exact) <= ulp + slack), (name, step)
            # stochastic: often, not always, other than the nearest
            away = got[f"{name}_bf16_bits"].reshape(-1) != want[f"{name}_bf16_bits"]
            assert 0.05 < away.mean() < 0.95, (name, away.mean())


def test_bf16_stochastic_rounding_keeps_exp_avg_sq_moving():
    """With round-to-nearest ``exp_avg_sq = 0.999 * 1.0`` rounds back to 1.0 forever; rounded
    stochastically it decays as 0.999**t on average."""
    n, steps = 8192, 200
    c = _hyper(dict(lr=1e-3)).constants(1, np.float32, 1.0)
    p, g = np.zeros(n, np.float32), np.zeros(n, np.float32)
    one = np.full(n, 0x3F80, np.uint16)  # bfloat16 1.0
    kernel = lean_cpu.KERNELS["adam/bf16state"]
    for stochastic, want in ((0, 1.0), (1, 0.999**steps)):
        m, v = np.zeros(n, np.uint16), one.copy()
        for t in range(steps):
            kernel(p, g, m, v, c, (stochastic, 7, t))
        mean = R.decode_bf16(v).mean()
        assert abs(mean - want) < 0.01 * want, (stochastic, mean, want)


def test_state_dtype_is_validated_before_anything_changes():
    p = np.ones(8192, np.float32)
    for bad in ("float16", "int4", 8, True):
        with pytest.raises(ValueError, match="state_dtype"):
            gpuadam.Adam([p], state_dtype=bad)
    with pytest.raises(ValueError, match="amsgrad"):
        gpuadam.Adam([p], amsgrad=True, state_dtype="int8")
    with pytest.raises(ValueError, match="float32 params"):
        gpuadam.Adam([np.ones(8192)], state_dtype="bfloat16")
    # cannot change mid-run: a state_dict of another state_dtype is refused, nothing changes
    lean, plain = gpuadam.Adam([p.copy()], state_dtype="int8"), gpuadam.Adam([p.copy()])
    lean.step([np.ones_like(p)])
    before = lean.state_dict()
    with pytest.raises(ValueError, match="cannot change mid-run"):
        lean.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="cannot change mid-run"):
        plain.load_state_dict(before)
    after = lean.state_dict()
    assert all(np.array_equal(before["state"][0][k], after["state"][0][k]) for k in before["state"][0])
    # a codes array of the wrong shape is refused with its name
    broken = lean.state_dict()
    broken["state"][0]["exp_avg_absmax"] = broken["state"][0]["exp_avg_absmax"][:-1]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        lean.load_state_dict(broken)
    # a negative absmax (a corrupted checkpoint) would flip its block's signs: refused, nothing changes
    broken = lean.state_dict()
    broken["state"][0]["exp_avg_sq_absmax"] = broken["state"][0]["exp_avg_sq_absmax"].copy()
    broken["state"][0]["exp_avg_sq_absmax"][[1, 3]] *= -1
    with pytest.raises(ValueError, match="param 0: state 'exp_avg_sq_absmax' holds 2 negative value"):
        lean.load_state_dict(broken)
    after = lean.state_dict()
    assert all(np.array_equal(before["state"][0][k], after["state"][0][k]) for k in before["state"][0])


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_checkpoint_resumes_bit_exactly(tmp_path, state_dtype):
    rng = np.random.default_rng(5)
    shapes = [(64, 80), (300,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    opt = gpuadam.Adam(params, lr=1e-2, state_dtype=state_dtype)
    for g in grads[:3]:
        opt.step(g)
    path = tmp_path / "lean.npz"
    opt.save(path)
    copies = [p.copy() for p in params]
    resumed = gpuadam.Adam(copies, lr=1e-2, state_dtype=state_dtype)
    resumed.load(path)
    for g in grads[3:]:
        opt.step(g)
        resumed.step(g)
    assert all(np.array_equal(a, b) for a, b in zip(params, copies))
    a, b = opt.state_dict()["state"], resumed.state_dict()["state"]
    assert all(np.array_equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_state_nbytes_and_flatbuffer_views():
    """int8: 2 bytes and 2 absmax per 256 per element (~2.03 B/param), bfloat16 4, float32 8. A
    FlatBuffer's views each start their own blocks, and step as the same tensors alone do."""
    n = 1 << 16
    sizes = {sd: gpuadam.Adam([np.zeros(n, np.float32)], state_dtype=sd).state_nbytes / n
             for sd in (None, "bfloat16", "int8")}
    assert sizes == {None: 8.0, "bfloat16": 4.0, "int8": 2.03125}
    rng = np.random.default_rng(6)
    shapes = [(5000,), (70, 90), (10,)]
    buf = gpuadam.FlatBuffer(shapes)
    alone = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    for view, a in zip(buf.views, alone):
        view[...] = a
    fused = gpuadam.Adam(buf.views, lr=1e-2, state_dtype="int8")
    single = gpuadam.Adam(alone, lr=1e-2, state_dtype="int8")
    gbuf = gpuadam.FlatBuffer(shapes)
    for _ in range(3):
        for view in gbuf.views:
            view[...] = rng.standard_normal(view.shape)
        fused.step(gbuf.views)
        single.step([np.array(v) for v in gbuf.views])
    assert all(np.array_equal(v, a) for v, a in zip(buf.views, alone))
    assert fused.state_dict()["state"][1]["exp_avg_absmax"].shape == (-(-6300 // BLOCK),)


# --- bitsandbytes' Adam8bit as a witness -------------------------------------------------------


def _quadratic_grads(steps, n, seed):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal(n).astype(np.float32)
    scale = (10.0 ** rng.uniform(-2, 1, n)).astype(np.float32)
    noise = [(rng.standard_normal(n) * 0.1).astype(np.float32) for _ in range(steps)]
    return lambda p, t: (scale * (p - target) + noise[t]).astype(np.float32)


def test_int8_trajectory_and_states_against_bitsandbytes():
    """Over 200 steps of a noisy quadratic, our int8 run stays no farther from the float32 run than
    bitsandbytes' Adam8bit; and one step from their state gives their param and absmax and codes within
    one code for most elements: their CPU quantiser is not always the nearest code (it sends tiny
    values to small nonzero codes), ours is, so ours is never the farther from the exact moment."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    n, steps, lr = 8192, 200, 1e-2
    grad = _quadratic_grads(steps, n, 8)
    start = np.random.default_rng(9).standard_normal(n).astype(np.float32)
    runs = {}
    for name in ("float32", "int8"):
        p = start.copy()
        opt = gpuadam.Adam([p], lr=lr, state_dtype=None if name == "float32" else "int8")
        for t in range(steps):
            opt.step([grad(p, t)])
        runs[name] = p
    tp = torch.nn.Parameter(torch.from_numpy(start.copy()))
    theirs = bnb.optim.Adam8bit([tp], lr=lr)
    for t in range(steps):
        tp.grad = torch.from_numpy(grad(tp.detach().numpy(), t))
        theirs.step()
    ours_dist = np.linalg.norm(runs["int8"] - runs["float32"])
    bnb_dist = np.linalg.norm(tp.detach().numpy() - runs["float32"])
    assert ours_dist <= bnb_dist, (ours_dist, bnb_dist)
    # one step from bitsandbytes' own state (5 steps in), the same gradient for both: the same
    # param and absmax; codes the nearest, so never farther from the exact moment than theirs
    rng = np.random.default_rng(10)
    gs = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(np.float32) for _ in range(6)]
    tp = torch.nn.Parameter(torch.from_numpy(start.copy()))
    theirs = bnb.optim.Adam8bit([tp], lr=lr)
    for g in gs[:5]:
        tp.grad = torch.from_numpy(g.copy())
        theirs.step()
    st = theirs.state[tp]
    assert np.array_equal(st["qmap1"].numpy(), SIGNED) and np.array_equal(st["qmap2"].numpy(), UNSIGNED)
    names = {"exp_avg": ("state1", "absmax1"), "exp_avg_sq": ("state2", "absmax2")}
    saved = {"step": 5}
    for mine, (codes, absmax) in names.items():
        saved[f"{mine}_codes"] = st[codes].numpy().copy()
        saved[f"{mine}_absmax"] = st[absmax].numpy().copy()
    p = tp.detach().numpy().copy()
    opt = gpuadam.Adam([p], lr=lr, state_dtype="int8")
    sd = opt.state_dict()
    sd["state"][0] = saved
    opt.load_state_dict(sd)
    _, _, exact = R.int8_reference(p.copy(), gs[5], saved, _hyper(dict(lr=lr)), 6)
    opt.step([gs[5]])
    tp.grad = torch.from_numpy(gs[5].copy())
    theirs.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    ours = opt.state_dict()["state"][0]
    for (mine, (codes, absmax)), table in zip(names.items(), (SIGNED, UNSIGNED)):
        np.testing.assert_allclose(ours[f"{mine}_absmax"], st[absmax].numpy(), rtol=1e-6)
        ours_value = R.decode_int8(ours[f"{mine}_codes"], ours[f"{mine}_absmax"], table)
        their_value = R.decode_int8(st[codes].numpy(), st[absmax].numpy(), table)
        scale = np.repeat(ours[f"{mine}_absmax"].astype(np.float64), BLOCK)
        ours_err = np.abs(ours_value - exact[mine])
        their_err = np.abs(their_value - exact[mine])
        assert np.all(ours_err <= their_err + 1e-6 * scale), mine
        close = np.abs(ours[f"{mine}_codes"].astype(int) - st[codes].numpy().astype(int)) <= 1
        assert close.mean() > 0.95, (mine, close.mean())


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_half_params_with_master_weights_and_lean_state(state_dtype):
    """float16 params, float32 master weights, lean moments: the master steps as float32 params with
    the same lean state do, and the half param is the master rounded to nearest."""
    rng = np.random.default_rng(11)
    p16 = rng.standard_normal((80, 64)).astype(np.float16)
    p32 = p16.astype(np.float32)
    half = gpuadam.Adam([p16], lr=1e-2, master_weights=True, state_dtype=state_dtype)
    plain = gpuadam.Adam([p32], lr=1e-2, state_dtype=state_dtype)
    for _ in range(3):
        g = rng.standard_normal(p16.shape).astype(np.float16)
        half.step([g])
        plain.step([g.astype(np.float32)])
    a, b = half.state_dict()["state"][0], plain.state_dict()["state"][0]
    assert np.array_equal(a["master"], p32)
    assert np.array_equal(p16, p32.astype(np.float16))
    assert all(np.array_equal(a[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="master_weights"):
        gpuadam.Adam([p16], state_dtype=state_dtype)


#: The other rules whose state is exp_avg and exp_avg_sq, each with its float64 reference and hyper.
MOMENT_RULES = {
    "NAdam": (dict(lr=1e-2, weight_decay=0.01, momentum_decay=4e-3), "nadam_reference", "NAdamHyper"),
    "NAdamW": (dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True), "nadam_reference", "NAdamHyper"),
    "RAdam": (dict(lr=1e-2, weight_decay=0.01), "radam_reference", "RAdamHyper"),
}


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("case", sorted(MOMENT_RULES))
def test_nadam_and_radam_keep_lean_moments_as_the_reference(case, state_dtype):
    """NAdam and RAdam keep the same lean moments as Adam: the rule's own float64 step between
    decoding and encoding (NAdam's ``mu_product`` carried as the optimizer carries it), over steps
    on both sides of RAdam's rectification threshold (``rho_t > 5`` from step 6)."""
    from gpuadam import hyper as H
    from gpuadam import reference

    kwargs, ref_name, hyper_name = MOMENT_RULES[case]
    cls = gpuadam.NAdam if case.startswith("NAdam") else gpuadam.RAdam
    full = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decoupled_weight_decay": False,
            "maximize": False, **({"momentum_decay": 4e-3} if cls is gpuadam.NAdam else {}), **kwargs}
    hyper = getattr(H, hyper_name).from_kwargs(**full)
    step_ref = (R.int8_reference if state_dtype == "int8" else R.bf16_reference)
    rng = np.random.default_rng(6)
    p = rng.standard_normal(N).astype(np.float32)
    opt = cls([p], state_dtype=state_dtype, **kwargs)
    assert opt.state_format == state_dtype
    carried = {}  # the reference's own state beside the moments (NAdam's mu_product)
    for step in range(1, 8):
        g = (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 0, N)).astype(np.float32)
        before, state = p.copy(), _lean_state(opt.state_dict())
        want_p, want, moments = step_ref(before, g, {**state, **carried}, hyper, step, getattr(reference, ref_name))
        carried = {k: v for k, v in want.items() if k not in lean.NAMES[state_dtype]}
        opt.step([g])
        got = _lean_state(opt.state_dict())
        assert set(got) == set(lean.NAMES[state_dtype])
        np.testing.assert_allclose(p, want_p, rtol=2e-6, atol=1e-6 * np.abs(want_p).max())
        for name, exact in moments.items():
            if state_dtype == "int8":
                np.testing.assert_allclose(got[f"{name}_absmax"], want[f"{name}_absmax"], rtol=2e-6)
                diff = np.abs(got[f"{name}_codes"].reshape(-1).astype(int) - want[f"{name}_codes"].astype(int))
                assert diff.max() <= 1 and diff.mean() < 1e-3, (name, step, diff.max(), diff.mean())
            else:  # rounded stochastically: a bfloat16 neighbour of the exact moment
                got_value = R.decode_bf16(got[f"{name}_bf16_bits"])
                ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
                assert np.all(np.abs(got_value - exact) <= ulp + 1e-6 * np.abs(exact).max()), (name, step)


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_state_dtype_is_refused_where_the_state_is_not_the_two_moments(state_dtype):
    """AMSGrad keeps a third array (``max_exp_avg_sq``): refused, naming the rules that fit."""
    p = np.zeros(5000, np.float32)
    with pytest.raises(ValueError, match="whose state is exp_avg and exp_avg_sq .*'amsgrad'"):
        gpuadam.Adam([p], amsgrad=True, state_dtype=state_dtype)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16-master"])
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_the_parallel_host_loops_are_the_serial_ones(state_dtype, half):
    """From ``numba_cpu.PARALLEL_MIN`` elements the host kernels run their ``prange`` loops (int8:
    chunks of blocks, each with its own scratch): bit for bit the serial loops, with a partial last
    chunk and block, and with half params and float32 masters."""
    from gpuadam.kernels import lean_maps, lowp
    from gpuadam.kernels.numba_cpu import PARALLEL_MIN

    n = PARALLEL_MIN + 3 * BLOCK + 77
    rng = np.random.default_rng(12)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(np.float32)
    c = _hyper(dict(lr=1e-2, weight_decay=0.01)).constants(3, np.float32, 1.0)
    fmt, half_param = 0, np.zeros(0, np.uint16)
    if half:  # the gradient as float16 bits, the half param written from the master
        g, fmt, half_param = g.astype(np.float16).view(np.uint16), lowp.FLOAT16, np.zeros(n, np.uint16)
    rounding = (fmt, 0, 0, 0, 0)
    if state_dtype == "int8":
        blocks = -(-n // BLOCK)
        state = [rng.integers(0, 256, n).astype(np.uint8), rng.uniform(0.01, 0.1, blocks).astype(np.float32),
                 rng.integers(0, 256, n).astype(np.uint8), rng.uniform(1e-4, 1e-3, blocks).astype(np.float32)]
        run = lean_cpu.KERNELS["adam/int8"]
        maps = (lean_maps.SIGNED, lean_maps.SIGNED_BUCKETS, lean_maps.SIGNED_THRESHOLDS,
                lean_maps.UNSIGNED, lean_maps.UNSIGNED_BUCKETS, lean_maps.UNSIGNED_THRESHOLDS)

        def step(arrays, serial):
            if serial:
                run.serial(*arrays[:6], c, *maps, fmt, arrays[6])
            else:
                run(*arrays[:6], c, rounding, arrays[6])
    else:
        state = [(rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                 for _ in range(2)]
        run = lean_cpu.KERNELS["adam/bf16state"]
        state_rounding = (1, 7, 3)

        def step(arrays, serial):
            if serial:
                run.variants[True][1](*arrays[:4], c, state_rounding, fmt, arrays[4])
            else:
                run(*arrays[:4], c, state_rounding, rounding, arrays[4])

    arrays = [p, g, *state, half_param]
    ours, theirs = [a.copy() for a in arrays], [a.copy() for a in arrays]
    step(ours, serial=False)
    step(theirs, serial=True)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert not np.array_equal(ours[0], p)
    if half:
        assert np.array_equal(ours[-1], ours[0].astype(np.float16).view(np.uint16))


def test_lean_stages_script_reports_every_stage(capsys):
    """``scripts/lean_stages.py`` (BENCHMARKS.md's stage figures) runs, and its stages add up."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "lean_stages.py"
    spec = importlib.util.spec_from_file_location("_lean_stages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--size", "8192", "--repeat", "2", "--inner", "1"]) == 0
    rows = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1])
            for line in capsys.readouterr().out.splitlines()[1:]}
    assert len(rows) == 7 and all(t > 0 for name, t in rows.items() if not name.startswith("int8 update")), rows
    whole = rows["int8 block loop (whole)"]
    parts = rows["int8 dequantise, both moments"] + rows["int8 requantise, both moments"]
    assert rows["int8 update and absmax (whole - both stages)"] == pytest.approx(whole - parts, abs=0.02)
