"""Runs each file of tests/simulator in a subprocess with Numba's CUDA simulator switched on: a
failure names its file here, and the failing cases in its message."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).parent / "simulator"
FILES = sorted(p.name for p in FOLDER.glob("test_*.py"))


def test_every_simulator_file_is_run():
    assert len(FILES) >= 4, FILES


@pytest.mark.parametrize("name", FILES)
def test_numba_cuda_kernels_in_the_simulator(name):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(FOLDER / name)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    failing = [line for line in out.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert out.returncode == 0, "\n".join(failing) + "\n\n" + out.stdout[-6000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", last)
    assert passed and int(passed.group(1)) >= 2, out.stdout[-3000:]
    assert "skipped" not in last, out.stdout[-3000:]
