"""scripts/harness_step.py runs, reports every contestant and each array's offset, and refuses a
bad --order in one line. No timing assertions."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def harness(monkeypatch):
    spec = importlib.util.spec_from_file_location("_script_harness_step", ROOT / "scripts" / "harness_step.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("aligned", [[], ["--aligned"]])
def test_harness_times_every_contestant(harness, tmp_path, aligned):
    pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
    out = tmp_path / "h.json"
    assert harness.main(["--size", "5000", "--reps", "3", "--order", "torch,ours,same-bytes",
                         "--json", str(out), *aligned]) == 0
    doc = json.loads(out.read_text())
    assert doc["order"] == ["torch", "ours", "same-bytes"] and doc["aligned"] == bool(aligned)
    for name in doc["order"]:
        r = doc["results"][name]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert set(doc["offsets"][name]) == {"p", "g", "m", "v"}
    if aligned:  # the harness's own arrays, and ours' state beside them, start on a line
        assert doc["offsets"]["same-bytes"] == {"p": 0, "g": 0, "m": 0, "v": 0}
        assert doc["offsets"]["ours"] == {"p": 0, "g": 0, "m": 0, "v": 0}
    assert doc["torch_over_ours_median"] > 0


def test_harness_refuses_an_unknown_contestant(harness, capsys):
    assert harness.main(["--order", "ours,jax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness_step: --order: got 'ours,jax'") and err.count("\n") == 1
