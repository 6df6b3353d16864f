"""``gpuadam.torch``'s Adam/AdamW with ``state_dtype`` ("int8", "bfloat16"): ``opt.state[p]`` holds the
lean buffers the kernel updates (codes, absmax, bfloat16 moments; float32 moments under 4096 elements),
the trajectory is gpuadam's own optimizer's bit for bit (tensors, flattened, half params with master
weights), a checkpoint resumes bit for bit, and a state of another format is refused."""

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the drop-in tests need pip install -e '.[test]'")

import gpuadam  # noqa: E402
import gpuadam.torch as gt  # noqa: E402

STEPS = 4
LEAN = {"int8": ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"),
        "bfloat16": ("exp_avg_bf16_bits", "exp_avg_sq_bf16_bits")}


def make_model(dtype=torch.float32):
    """A weight of 5120 elements (lean state, 20 blocks) and three tensors under 4096 (float32 state in int8)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3)).to(dtype)


def batches(dtype=torch.float32, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype))
            for _ in range(steps)]


def backward(model, x, y):
    torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()


def bits(t):
    """A tensor's memory as NumPy (half tensors as their uint16 patterns), a copy."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16).copy().reshape(-1)
    return t.numpy().copy().reshape(-1)


def train(model, opt, data, ref=None):
    """Step ``opt`` over ``data`` (and gpuadam's ``ref`` on the same gradient bits, when given)."""
    for x, y in data:
        opt.zero_grad(set_to_none=False)
        backward(model, x, y)
        opt.step()
        if ref is not None:
            ref.step([bits(p.grad) for p in model.parameters()])


def assert_same_as_core(model, opt, ref, fmt):
    for k, p in enumerate(model.parameters()):
        state, theirs = opt.state[p], ref.state[k]
        lean = p.numel() >= 4096 or fmt == "bfloat16"
        names = LEAN[fmt] if lean else ("exp_avg", "exp_avg_sq")
        assert [n for n in state if n not in ("step", "master")] == list(names), k
        assert state["step"].item() == ref.steps[k]
        np.testing.assert_array_equal(bits(p), np.asarray(ref._flat[k]).reshape(-1), err_msg=f"param {k}")
        for n, a in theirs.items():
            np.testing.assert_array_equal(bits(state[n]), np.asarray(a).reshape(-1), err_msg=f"{k} {n}")


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flattened"])
def test_lean_state_steps_bitwise_as_gpuadams_optimizer(fmt, flat):
    model = make_model()
    p0 = [bits(p) for p in model.parameters()]
    if flat:
        gt.flatten_parameters(model)
    opt = gt.AdamW(model.parameters(), lr=1e-2, state_dtype=fmt)
    ref = gpuadam.AdamW(p0, lr=1e-2, state_dtype=fmt)
    train(model, opt, batches(), ref)
    assert_same_as_core(model, opt, ref, fmt)
    w = model[0].weight
    codes = opt.state[w][LEAN[fmt][0]]
    assert codes.dtype == (torch.uint8 if fmt == "int8" else torch.bfloat16) and codes.shape == w.shape
    if fmt == "int8":
        assert opt.state[w]["exp_avg_absmax"].shape == (20,) and opt.state[w]["exp_avg_absmax"].dtype == torch.float32
    # the state tensors are the kernel's buffers: the next step writes them in place
    ptr, before = codes.data_ptr(), codes.clone()
    train(model, opt, batches(steps=1))
    assert codes.data_ptr() == ptr and not torch.equal(codes, before)
    assert opt.last_step_launches == 4  # lean state is blocked per tensor: one launch per param
    small = sum(p.numel() for p in model.parameters()) - w.numel()
    lean_bytes = 2 * w.numel() + 2 * 20 * 4 if fmt == "int8" else 4 * w.numel()
    small_bytes = 8 * small if fmt == "int8" else 4 * small
    assert opt.state_nbytes == ref.state_nbytes == lean_bytes + small_bytes  # flattened too: per tensor


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_half_params_master_weights_with_lean_state(fmt):
    model = make_model(torch.bfloat16)
    p0 = [bits(p) for p in model.parameters()]
    opt = gt.Adam(model.parameters(), lr=1e-2, master_weights=True, state_dtype=fmt)
    ref = gpuadam.Adam(p0, lr=1e-2, half_format="bfloat16", master_weights=True, state_dtype=fmt)
    train(model, opt, batches(torch.bfloat16), ref)
    assert_same_as_core(model, opt, ref, fmt)
    assert opt.state[model[0].weight]["master"].dtype == torch.float32


@pytest.mark.parametrize("fmt, dtype", [("int8", torch.float32), ("bfloat16", torch.float32),
                                        ("int8", torch.bfloat16)])
def test_checkpoint_resumes_bit_for_bit(fmt, dtype):
    kw = {"master_weights": True} if dtype == torch.bfloat16 else {}
    data = batches(dtype, steps=6)
    model = make_model(dtype)
    opt = gt.AdamW(model.parameters(), lr=1e-2, state_dtype=fmt, **kw)
    train(model, opt, data[:3])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    train(model, opt, data[3:])
    saved.seek(0)
    ckpt = torch.load(saved)
    assert ckpt["opt"]["gpuadam"]["state_dtype"] == fmt
    resumed = make_model(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = gt.AdamW(resumed.parameters(), lr=1e-2, state_dtype=fmt, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(bits(p), bits(q))
        assert list(opt.state[p]) == list(opt2.state[q])
        for n, t in opt.state[p].items():
            assert t.dtype == opt2.state[q][n].dtype, n
            np.testing.assert_array_equal(bits(t), bits(opt2.state[q][n]), err_msg=n)


def test_a_state_of_another_format_is_refused_and_nothing_changes():
    model = make_model()
    data = batches(steps=1)
    int8 = gt.Adam(model.parameters(), state_dtype="int8")
    train(model, int8, data)
    plain = torch.optim.Adam(model.parameters())
    train(model, plain, data)
    bf16 = gt.Adam(model.parameters(), state_dtype="bfloat16")
    train(model, bf16, data)
    before = {n: t.clone() for n, t in bf16.state[model[0].weight].items()}
    for other, saved in (("'int8'", int8.state_dict()), ("None", plain.state_dict())):
        with pytest.raises(ValueError, match=f"saved with state_dtype={other}.*keeps state_dtype='bfloat16'"):
            bf16.load_state_dict(saved)
    for n, t in bf16.state[model[0].weight].items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(ValueError, match="saved with state_dtype='int8', this optimizer keeps state_dtype=None"):
        gt.Adam(model.parameters()).load_state_dict(int8.state_dict())
    # torch's state_dict holds the live state dicts: each edit below works on its own deep copy
    edited = copy.deepcopy(int8.state_dict())
    edited["state"][0]["exp_avg_absmax"] = edited["state"][0]["exp_avg_absmax"][:5]
    with pytest.raises(ValueError, match="param 0: state 'exp_avg_absmax': expected a torch.float32 tensor of 20"):
        gt.Adam(model.parameters(), state_dtype="int8").load_state_dict(edited)
    edited = copy.deepcopy(int8.state_dict())
    edited["state"][0]["exp_avg_absmax"] = -edited["state"][0]["exp_avg_absmax"]
    fresh = gt.Adam(model.parameters(), state_dtype="int8")
    with pytest.raises(ValueError, match="param 0: state 'exp_avg_absmax' holds .* negative value.*nothing was loaded"):
        fresh.load_state_dict(edited)
    assert not fresh.state


def test_lean_state_refusals():
    model = make_model()
    with pytest.raises(ValueError, match="state_dtype: expected one of"):
        gt.Adam(model.parameters(), state_dtype="int4")
    with pytest.raises(ValueError, match=r"whose state is exp_avg and exp_avg_sq \(adam, nadam, radam; amsgrad "
                                         r"keeps a third array\), this group's rule is 'amsgrad'"):
        gt.Adam(model.parameters(), amsgrad=True, state_dtype="int8")
    with pytest.raises(ValueError, match="is for float32 params, or half params with master_weights=True, got "
                                         "torch.float64"):
        gt.Adam(make_model(torch.float64).parameters(), state_dtype="int8")
    with pytest.raises(ValueError, match="got torch.bfloat16"):
        gt.Adam(make_model(torch.bfloat16).parameters(), state_dtype="bfloat16")
    with pytest.raises(TypeError):
        gt.SGD(model.parameters(), lr=0.1, state_dtype="int8")
    opt = gt.Adam(model.parameters(), state_dtype="int8")
    opt.param_groups[0]["amsgrad"] = True
    train(model, gt.Adam(model.parameters()), batches(steps=1))  # gradients
    w = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="rule is 'amsgrad'; nothing was updated"):
        opt.step()
    assert torch.equal(model[0].weight.detach(), w) and not opt.state
