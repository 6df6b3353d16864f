"""The demos: ``gpuadam demo`` in a quick configuration on Numba CPU, and the two plotting scripts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuadam
from gpuadam import cli, demo

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {
    "optimizer", "class", "kwargs", "diverged", "final_train_loss", "item_accuracy",
    "domain_accuracy", "step_us_median", "launches_per_step",
}


def _need(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'gpuadam[demo]')")


def _run_demo(tmp_path: Path, *extra: str) -> dict:
    assert cli.main(["demo", "--quick", "--backend", "numba-cpu", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / demo.JSON_NAME).read_text())


def test_demo_quick_trains_every_available_optimizer(tmp_path, capsys):
    _need("sklearn", "matplotlib", "tqdm")
    table = _run_demo(tmp_path)
    assert (tmp_path / demo.PNG_NAME).read_bytes()[:8] == PNG_MAGIC
    assert table["backend"] == "numba-cpu"
    assert table["config"]["steps"] == demo.QUICK_STEPS
    assert table["config"]["n_train"] > 0 and table["config"]["n_test"] > 0
    results = table["results"]
    assert [r["optimizer"] for r in results] == ["SGD", "Momentum", "RMSprop", "AdaGrad", "Adam", "AdamW"]
    initial = table["initial_train_loss"]
    assert np.isfinite(initial)
    for r in results:
        assert RESULT_KEYS <= set(r), r
        assert not r["diverged"], r
        assert r["final_train_loss"] < initial, r  # every optimizer made progress
        assert 0.0 <= r["item_accuracy"] <= 1.0 and 0.0 <= r["domain_accuracy"] <= 1.0
        assert r["step_us_median"] > 0
        assert r["launches_per_step"] == 1, r  # the whole model in one fused launch
    adam = next(r for r in results if r["optimizer"] == "Adam")
    # 150 steps is a smoke test, not a comparison; chance is 10% and 33%.
    assert adam["item_accuracy"] > 0.5 and adam["domain_accuracy"] > 0.8, adam
    out = capsys.readouterr().out
    assert "item acc" in out and "Adam" in out


def test_every_contender_is_a_gpuadam_class():
    """The demo trains each contender with no fallback for a missing class: each must exist."""
    for contender in demo.CONTENDERS:
        assert issubclass(getattr(gpuadam, contender.class_name), gpuadam.Optimizer), contender


def test_demo_refuses_an_unavailable_backend_with_the_reason(tmp_path, capsys):
    _need("sklearn", "matplotlib", "tqdm")
    st = gpuadam.available_backends()["cupy"]
    if st.available:
        pytest.skip("CuPy can run here")
    assert cli.main(["demo", "--backend", "cupy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert st.reason in err and err.startswith("gpuadam demo: --backend: got 'cupy'") and err.count("\n") == 1
    assert not (tmp_path / demo.PNG_NAME).exists()


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    hidden, n = 6, 5
    shapes = demo.shapes(hidden)
    params = [rng.standard_normal(s) * 0.5 for s in shapes]
    grads = [np.zeros(s) for s in shapes]
    x = rng.random((n, 64))
    item, domain = rng.integers(0, 10, n), rng.integers(0, 3, n)
    net = demo.TwoHeadedNet(np, params, grads)
    loss = float(net.loss_and_grad(x, item, domain))
    assert loss == pytest.approx(net.loss(x, item, domain))
    h = 1e-6
    for p, g in zip(params, grads):
        for index in list(np.ndindex(p.shape))[:: max(1, p.size // 7)]:
            saved = p[index]
            p[index] = saved + h
            up = net.loss(x, item, domain)
            p[index] = saved - h
            down = net.loss(x, item, domain)
            p[index] = saved
            assert g[index] == pytest.approx((up - down) / (2 * h), abs=1e-6)


def test_demo_torch_framework_trains_a_flattened_module_with_one_launch(tmp_path, capsys):
    _need("sklearn", "matplotlib", "tqdm", "torch")
    table = _run_demo(tmp_path, "--framework", "torch", "--steps", "20")
    assert table["framework"] == "torch" and table["config"]["steps"] == 20
    for r in table["results"]:
        assert RESULT_KEYS <= set(r) and not r["diverged"], r
        assert r["final_train_loss"] < table["initial_train_loss"], r
        assert r["launches_per_step"] == 1, r  # the flattened module in one fused launch
        assert 0 < r["step_us_median"] < r["iteration_us_median"]
    assert "stepped by gpuadam.torch" in capsys.readouterr().out


def test_the_torch_module_is_the_numpy_network():
    """Autograd's loss and gradients of the torch module are the hand-written NumPy ones."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
    from gpuadam import demo_torch

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) * 0.5 for s in demo.shapes(6)]
    grads = [np.zeros_like(p) for p in params]
    x = rng.random((5, 64))
    item, domain = rng.integers(0, 10, 5), rng.integers(0, 3, 5)
    loss = float(demo.TwoHeadedNet(np, params, grads).loss_and_grad(x, item, domain))
    module = demo_torch.TwoHeadedModule(params, "cpu")
    theirs = module.loss(torch.tensor(x), torch.tensor(item), torch.tensor(domain))
    theirs.backward()
    assert theirs.item() == pytest.approx(loss, rel=1e-12)
    for g, p in zip(grads, module.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-10, atol=1e-12)


def _script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["plot_paths", "plot_bias_correction"])
def test_plot_script_writes_a_png(name, tmp_path, monkeypatch):
    _need("matplotlib")
    out = tmp_path / "sub" / f"{name}.png"
    assert _script(name, monkeypatch).main(["--quick", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_demo_state_dtype_adds_lean_rows_with_their_state_bytes(tmp_path, capsys):
    _need("sklearn", "matplotlib", "tqdm")
    table = _run_demo(tmp_path, "--state-dtype", "int8", "--steps", "30")
    results = {r["optimizer"]: r for r in table["results"]}
    assert list(results)[-2:] == ["Adam/int8", "AdamW/int8"]
    for name in ("Adam", "AdamW"):
        lean, plain = results[f"{name}/int8"], results[name]
        assert lean["kwargs"]["state_dtype"] == "int8" and not lean["diverged"]
        # the 64x128 layer keeps codes (2.03 B/param), the small ones float32 (8 B/param)
        assert lean["state_bytes"] < 0.5 * plain["state_bytes"], (lean["state_bytes"], plain["state_bytes"])
        # lean state steps a FlatBuffer view by view
        assert lean["launches_per_step"] == len(demo.shapes(table["config"]["hidden"]))
    assert "state (B)" in capsys.readouterr().out


def test_demo_state_dtype_with_the_torch_framework(tmp_path):
    """``--framework torch --state-dtype``: gpuadam.torch's classes take ``state_dtype`` too."""
    _need("sklearn", "matplotlib", "tqdm", "torch")
    table = _run_demo(tmp_path, "--framework", "torch", "--state-dtype", "bfloat16", "--steps", "30")
    results = {r["optimizer"]: r for r in table["results"]}
    assert table["framework"] == "torch" and list(results)[-2:] == ["Adam/bfloat16", "AdamW/bfloat16"]
    assert results["Adam/bfloat16"]["state_bytes"] == results["Adam"]["state_bytes"] // 2
    assert not results["Adam/bfloat16"]["diverged"]
