"""``gpuadam.torch.flatten_parameters``: a flattened module steps with one launch per group and
trains exactly as torch.optim trains the same module; fresh gradients (``set_to_none=True``), a load,
``module.to()`` and ``module.state_dict()`` keep working."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")
import torch_models  # noqa: E402
from torch_models import make_model  # noqa: E402

import gpuadam.torch as gt  # noqa: E402

STEPS = 12


batches = functools.partial(torch_models.batches, steps=STEPS)


def train(model, opt, data, set_to_none=False):
    launches = []
    for x, y in data:
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        launches.append(getattr(opt, "last_step_launches", None))
    return launches


def assert_same(model, ref):
    for k, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"param {k}")


@pytest.mark.parametrize("name, kw", [("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
                                      ("SGD", {"lr": 1e-2, "momentum": 0.9}),
                                      ("Adagrad", {"lr": 1e-2, "initial_accumulator_value": 0.1})])
def test_a_flattened_module_trains_as_torch_with_one_launch(name, kw):
    model, ref = make_model(), make_model()
    (buf,) = gt.flatten_parameters(model)
    assert buf.data.data_ptr() % 64 == 0 and buf.grad.data_ptr() % 64 == 0
    for k, p in enumerate(model.parameters()):
        assert p.data_ptr() == buf.data.data_ptr() + buf.offsets[k] * 8 and buf.offsets[k] % 16 == 0
        assert p.grad is not None and p.grad.data_ptr() == buf.grad.data_ptr() + buf.offsets[k] * 8
    assert_same(model, ref)  # the values moved with the storage
    opt = getattr(gt, name)(model.parameters(), **kw)
    theirs = getattr(torch.optim, name)(ref.parameters(), foreach=False, **kw)
    assert train(model, opt, batches()) == [1] * STEPS
    train(ref, theirs, batches())
    assert_same(model, ref)
    for a, b in zip(model.parameters(), ref.parameters()):  # the state too, in torch's layout
        for n, t in theirs.state[b].items():
            np.testing.assert_allclose(opt.state[a][n].numpy(), t.numpy(), rtol=1e-12, atol=1e-14)


def test_one_launch_per_group_and_fresh_grads_still_train_right():
    model, ref = make_model(), make_model()
    groups = [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias],
                                                               "weight_decay": 0.0}]
    assert len(gt.flatten_parameters(groups)) == 2
    opt = gt.AdamW(groups, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([{"params": [ref[0].weight, ref[2].weight]},
                                {"params": [ref[0].bias, ref[2].bias], "weight_decay": 0.0}],
                               lr=1e-2, weight_decay=0.1, foreach=False)
    data = batches()
    assert train(model, opt, data[:4]) == [2] * 4
    # torch's default zero_grad drops the views: backward makes fresh grads, one launch per param
    assert train(model, opt, data[4:8], set_to_none=True) == [4] * 4
    train(ref, theirs, data[:8])
    assert_same(model, ref)


def test_a_load_module_state_dict_and_to_after_flattening():
    model, ref = make_model(torch.float32), make_model(torch.float32)
    gt.flatten_parameters(model)
    opt = gt.Adam(model.parameters(), lr=1e-2)
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    data = batches(torch.float32)
    train(model, opt, data[:3])
    train(ref, theirs, data[:3])
    opt.load_state_dict(theirs.state_dict())  # torch's checkpoint: copied into the whole buffers
    assert train(model, opt, data[3:6]) == [1] * 3
    train(ref, theirs, data[3:6])
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        np.testing.assert_allclose(ours_sd[key].numpy(), ref_sd[key].numpy(), rtol=2e-5, atol=1e-6, err_msg=key)
    # module.to(float64) gives the params new storage: stepped one by one, as torch's
    model.to(torch.float64)
    ref.to(torch.float64)
    opt = gt.Adam(model.parameters(), lr=1e-2)
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    model.load_state_dict(ref.state_dict())
    assert train(model, opt, batches()[:3], set_to_none=True) == [4] * 3
    train(ref, theirs, batches()[:3], set_to_none=True)
    assert_same(model, ref)


def test_refuses_what_it_cannot_flatten():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        gt.flatten_parameters(torch.zeros(3, requires_grad=True))
    with pytest.raises(ValueError, match="dense floating-point"):
        gt.flatten_parameters([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
