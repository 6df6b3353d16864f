"""Learning-rate schedules, the scheduler's step convention, and hyperparameter changes between steps."""

import math

import numpy as np
import pytest
from helpers import problem, trajectory_error

import gpuadam
from gpuadam.hyper import AdamHyper
from gpuadam.reference import adam_reference
from gpuadam.schedules import LRScheduler, constant, cosine_decay, linear_warmup

# --- values -------------------------------------------------------------------------------------


def values(schedule, steps):
    return [schedule(t) for t in steps]


def test_constant():
    assert values(constant(0.1), [1, 2, 10**9]) == [0.1, 0.1, 0.1]
    assert constant(0)(5) == 0.0


def test_linear_warmup_reaches_the_peak_at_warmup_steps():
    assert values(linear_warmup(1.0, 4), [1, 2, 3, 4, 5, 100]) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert values(linear_warmup(2.0, 0), [1, 7]) == [2.0, 2.0]
    assert values(linear_warmup(2.0, 1), [1, 2]) == [2.0, 2.0]


def test_cosine_decay_with_warmup():
    s = cosine_decay(1.0, total_steps=10, final_lr=0.1, warmup_steps=2)
    assert values(s, [1, 2]) == [0.5, 1.0]
    assert s(6) == pytest.approx(0.55, rel=1e-15)  # half way through the decay: the mean of the ends
    assert s(4) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    assert values(s, [10, 11, 10**6]) == [0.1, 0.1, 0.1]  # exactly final_lr from total_steps on
    decay = values(s, range(2, 12))
    assert all(a > b for a, b in zip(decay, decay[1:9]))


def test_cosine_decay_without_warmup_and_degenerate_ones():
    s = cosine_decay(2.0, total_steps=4)
    assert values(s, [2, 4, 5]) == [pytest.approx(1.0, rel=1e-15), 0.0, 0.0]
    assert 1.7 < s(1) < 2.0  # step 0 would be the peak: the first step is already on the curve
    assert values(cosine_decay(1.0, 3, warmup_steps=3), [1, 3, 4]) == [1 / 3, 1.0, 0.0]
    assert values(cosine_decay(1.0, 1), [1, 2]) == [0.0, 0.0]
    assert values(cosine_decay(0.5, 10, final_lr=0.5), [1, 5, 20]) == [0.5, 0.5, 0.5]


BAD = {
    "negative-lr": (lambda: constant(-1e-3), ValueError, "lr must be a finite number >= 0"),
    "nan-lr": (lambda: constant(float("nan")), ValueError, "lr must not be NaN"),
    "inf-lr": (lambda: linear_warmup(math.inf, 3), ValueError, "peak_lr must be a finite"),
    "string-lr": (lambda: constant("0.1"), TypeError, "lr must be a real number"),
    "negative-warmup": (lambda: linear_warmup(1.0, -1), ValueError, "warmup_steps must be >= 0"),
    "float-warmup": (lambda: linear_warmup(1.0, 2.5), TypeError, "warmup_steps must be an integer"),
    "warmup-past-total": (lambda: cosine_decay(1.0, 10, warmup_steps=11), ValueError, r"warmup_steps \(11\)"),
    "zero-total": (lambda: cosine_decay(1.0, 0), ValueError, "total_steps must be >= 1"),
    "final-above-peak": (lambda: cosine_decay(1.0, 10, final_lr=2.0), ValueError, "final_lr"),
    "negative-final": (lambda: cosine_decay(1.0, 10, final_lr=-0.1), ValueError, "final_lr must be a finite"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_are_refused(case):
    make, exc, message = BAD[case]
    with pytest.raises(exc, match=message):
        make()


@pytest.mark.parametrize("schedule", [constant(1.0), linear_warmup(1.0, 3), cosine_decay(1.0, 5, warmup_steps=2)])
def test_steps_count_from_one(schedule):
    with pytest.raises(ValueError, match="step must be >= 1, got 0"):
        schedule(0)
    with pytest.raises(TypeError, match="step must be an integer"):
        schedule(1.0)
    assert schedule(np.int64(2)) == schedule(2)


# --- the scheduler ------------------------------------------------------------------------------


def two_groups(params, **kw):
    return gpuadam.Adam([{"params": params[:2], "lr": 0.5}, {"params": params[2:]}], backend="numba-cpu", **kw)


def test_scheduler_sets_schedule_1_at_construction_and_advances_after_each_step():
    params, grads = problem(0, steps=6)
    opt = two_groups(params)
    s = cosine_decay(1e-2, total_steps=5, final_lr=1e-3, warmup_steps=2)
    sched = LRScheduler(opt, s)
    assert sched.current_step == 1
    assert [g["lr"] for g in opt.param_groups] == [s(1), s(1)]
    for t, g in enumerate(grads, start=1):
        assert sched.get_last_lr() == [s(t)] * 2 == [grp["lr"] for grp in opt.param_groups]
        opt.step(g)
        sched.step()
        assert sched.current_step == t + 1
    assert opt.steps == [6] * 4


def test_one_schedule_per_group_and_resuming():
    params, _ = problem(0, steps=1)
    opt = two_groups(params)
    a, b = linear_warmup(1e-2, 10), constant(3e-4)
    sched = LRScheduler(opt, [a, b], current_step=4)  # resuming after 3 optimizer steps
    assert sched.get_last_lr() == [a(4), b(4)]
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [a(5), 3e-4]


def test_scheduler_refuses_bad_schedules_without_changing_any_group():
    params, _ = problem(0, steps=1)
    opt = two_groups(params)
    with pytest.raises(ValueError, match=r"one per param group \(2\), got 3"):
        LRScheduler(opt, [constant(1.0)] * 3)
    with pytest.raises(TypeError, match="schedule 1: expected a callable"):
        LRScheduler(opt, [constant(1.0), 0.1])
    with pytest.raises(ValueError, match="current_step must be >= 1"):
        LRScheduler(opt, constant(1.0), current_step=0)
    sched = LRScheduler(opt, [constant(0.2), lambda t: 0.1 if t < 3 else -0.1])
    sched.step()
    with pytest.raises(ValueError, match="schedule 1: lr at step 3 must be a finite number >= 0, got -0.1"):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    assert sched.current_step == 2


# --- a changed hyperparameter takes effect at the next step -------------------------------------

CHANGE_AT = 5


def _changed_run(params0, grads):
    """Two groups; after step CHANGE_AT group 1's lr and group 0's weight decay change by hand."""
    params = [p.copy() for p in params0]
    opt = gpuadam.Adam(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-3}],
        weight_decay=0.0, backend="numba-cpu",
    )
    for t, g in enumerate(grads, start=1):
        opt.step(g)
        if t == CHANGE_AT:
            opt.param_groups[1]["lr"] = 5e-2
            opt.param_groups[0]["weight_decay"] = 0.1
    return params


def _hypers(t):
    late = t > CHANGE_AT
    return [AdamHyper(lr=1e-2, weight_decay=0.1 if late else 0.0), AdamHyper(lr=5e-2 if late else 1e-3)]


def test_changed_hyperparameters_apply_from_the_next_step():
    steps = 12
    params0, grads = problem(7, steps=steps)
    got = _changed_run(params0, grads)
    group_of = [0, 0, 1, 1]
    for i, (p, p0) in enumerate(zip(got, params0)):
        rp, state = p0, {}
        for t, g in enumerate(grads, start=1):
            rp, state = adam_reference(rp, g[i], state, _hypers(t)[group_of[i]], t)
        assert trajectory_error(p, rp, p0, steps) < 1.0
        unchanged, state = p0, {}
        for t, g in enumerate(grads, start=1):  # the same run with no change: far from ours
            unchanged, state = adam_reference(unchanged, g[i], state, _hypers(1)[group_of[i]], t)
        assert trajectory_error(p, unchanged, p0, steps) > 100.0


def test_changed_lr_matches_torch_param_groups():
    torch = pytest.importorskip("torch")
    steps = 12
    params0, grads = problem(8, steps=steps)
    ours = _changed_run(params0, grads)
    theirs = [torch.tensor(p.copy()) for p in params0]
    topt = torch.optim.Adam(
        [{"params": theirs[:2], "lr": 1e-2}, {"params": theirs[2:], "lr": 1e-3}], weight_decay=0.0, foreach=False
    )
    for t, g in enumerate(grads, start=1):
        for x, gx in zip(theirs, g):
            x.grad = torch.tensor(gx)
        topt.step()
        if t == CHANGE_AT:
            topt.param_groups[1]["lr"] = 5e-2
            topt.param_groups[0]["weight_decay"] = 0.1
    for a, b, p0 in zip(ours, theirs, params0):
        assert trajectory_error(a, b.numpy().astype(np.float64), p0, steps) < 2.0


def test_scheduler_matches_torch_lambda_lr():
    torch = pytest.importorskip("torch")
    steps = 25  # past total_steps: the constant tail too
    peaks = (1e-2, 3e-3)
    schedules = [cosine_decay(peaks[0], total_steps=20, final_lr=1e-3, warmup_steps=5), linear_warmup(peaks[1], 4)]
    params0, grads = problem(9, steps=steps)
    ours = [p.copy() for p in params0]
    opt = gpuadam.Adam([{"params": ours[:2]}, {"params": ours[2:]}], amsgrad=True, backend="numba-cpu")
    sched = LRScheduler(opt, schedules)
    theirs = [torch.tensor(p.copy()) for p in params0]
    topt = torch.optim.Adam(
        [{"params": theirs[:2], "lr": peaks[0]}, {"params": theirs[2:], "lr": peaks[1]}], amsgrad=True, foreach=False
    )
    # torch counts epochs from 0 and multiplies the base lr by a factor
    tsched = torch.optim.lr_scheduler.LambdaLR(
        topt, [lambda e, s=s, peak=peak: s(e + 1) / peak for s, peak in zip(schedules, peaks)]
    )
    for g in grads:
        for ours_lr, group in zip(sched.get_last_lr(), topt.param_groups):
            assert ours_lr == pytest.approx(group["lr"], rel=1e-15, abs=0)
        opt.step(g)
        for x, gx in zip(theirs, g):
            x.grad = torch.tensor(gx)
        topt.step()
        sched.step()
        tsched.step()
    for a, b, p0 in zip(ours, theirs, params0):
        assert trajectory_error(a, b.numpy().astype(np.float64), p0, steps) < 2.0
