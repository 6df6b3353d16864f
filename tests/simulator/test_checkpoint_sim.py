"""Checkpoints of an optimizer over simulated device arrays: save, load, continue is bit-identical."""

import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import problem  # noqa: E402

import gpuadam  # noqa: E402
from gpuadam import checkpoint  # noqa: E402

SHAPES = [(700,), (3, 5), (2, 129)]


def _optimizer(params, lr=1e-2):
    groups = [{"params": params[:1], "lr": lr}, {"params": params[1:]}]
    return gpuadam.Adam(groups, amsgrad=True, weight_decay=0.01, backend="numba-cuda")


def test_save_load_continue_on_device_is_bit_identical(tmp_path):
    steps, cut = 6, 3
    params0, grads = problem(12, shapes=SHAPES, steps=steps)
    straight = [cuda.to_device(p) for p in params0]
    opt = _optimizer(straight)
    for g in grads:
        opt.step([cuda.to_device(x) for x in g])

    first = [cuda.to_device(p) for p in params0]
    opt1 = _optimizer(first)
    for g in grads[:cut]:
        opt1.step([cuda.to_device(x) for x in g])
    checkpoint.save(opt1, tmp_path / "opt.ckpt")
    resumed = [cuda.to_device(p.copy_to_host()) for p in first]
    opt2 = _optimizer(resumed, lr=0.5)
    assert opt2.backend == "numba-cuda"
    checkpoint.load(opt2, tmp_path / "opt.ckpt")
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.steps == [cut] * 3
    for g in grads[cut:]:
        opt2.step([cuda.to_device(x) for x in g])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.copy_to_host(), b.copy_to_host())


def test_misfit_on_device_is_refused_and_changes_nothing(tmp_path):
    params0, grads = problem(13, shapes=SHAPES, steps=2)
    source = gpuadam.AdamW([cuda.to_device(p) for p in params0], backend="numba-cuda")
    source.step([cuda.to_device(x) for x in grads[0]])
    checkpoint.save(source, tmp_path / "c")
    opt = _optimizer([cuda.to_device(p) for p in params0])
    opt.step([cuda.to_device(x) for x in grads[1]])
    before = opt.state_dict()
    with pytest.raises(ValueError, match="saved by AdamW, this optimizer is Adam"):
        checkpoint.load(opt, tmp_path / "c")
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, s in before["state"].items():
        for k, v in s.items():
            np.testing.assert_array_equal(after["state"][i][k], v)


def test_steps_skipped_on_device_survives_save_and_load(tmp_path):
    """On a GPU the count lives in a device array, which the next skipped step increments: a load
    writes the saved count there."""
    params0, grads = problem(14, shapes=SHAPES, steps=2)
    poisoned = [g.copy() for g in grads[1]]
    poisoned[0].flat[0] = np.nan

    def build():
        return gpuadam.Adam([cuda.to_device(p) for p in params0], skip_nonfinite=True, backend="numba-cuda")

    opt = build()
    opt.step([cuda.to_device(x) for x in grads[0]])
    for _ in range(2):
        opt.step([cuda.to_device(x) for x in poisoned])
    assert opt.steps_skipped == 2 and opt.state_dict()["steps_skipped"] == 2
    checkpoint.save(opt, tmp_path / "c")
    by_file = build()
    by_file.load(tmp_path / "c")
    by_dict = build()
    by_dict.load_state_dict(opt.state_dict())
    for resumed in (by_file, by_dict):
        assert resumed.steps_skipped == 2 and resumed.steps == [1] * 3
        resumed.step([cuda.to_device(x) for x in poisoned])
        assert resumed.steps_skipped == 3 and resumed.steps == [1] * 3
