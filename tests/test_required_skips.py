"""``tests/skips.py``: a test skipped for a missing package is listed at the end of the run, and
fails the run under GPUADAM_REQUIRE_ALL=1; other skips do not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _pytest(folder: Path, require: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPUADAM_REQUIRE_ALL"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if require is not None:
        env["GPUADAM_REQUIRE_ALL"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "skips", "--rootdir", str(folder),
         str(folder)], env=env, capture_output=True, text=True, timeout=120, cwd=folder,
    )


@pytest.fixture
def missing_package(tmp_path):
    (tmp_path / "test_parity.py").write_text(
        "import pytest\ntorch = pytest.importorskip('no_such_package_for_gpuadam')\n\ndef test_a():\n    pass\n")
    (tmp_path / "test_other.py").write_text("def test_b():\n    pass\n")
    return tmp_path


def test_a_missing_package_is_listed_and_fails_when_required(missing_package):
    listed = _pytest(missing_package, None)
    assert listed.returncode == 0, listed.stdout
    assert "did not run: a package or tool is missing" in listed.stdout
    assert "no_such_package_for_gpuadam" in listed.stdout
    required = _pytest(missing_package, "1")
    assert required.returncode == 1, required.stdout
    assert "GPUADAM_REQUIRE_ALL=1: the run FAILS" in required.stdout


def test_other_skips_pass_when_required(tmp_path):
    (tmp_path / "test_gpu.py").write_text(
        "import pytest\n\ndef test_a():\n    pytest.skip('CuPy can run here')\n\ndef test_b():\n    pass\n")
    out = _pytest(tmp_path, "1")
    assert out.returncode == 0, out.stdout
    assert "did not run" not in out.stdout
