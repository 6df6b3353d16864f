"""Runs tests/simulator in a subprocess with Numba's CUDA simulator switched on."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_numba_cuda_kernels_in_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    folder = Path(__file__).parent / "simulator"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 10, out.stdout[-3000:]
    assert "skipped" not in out.stdout.splitlines()[-1], out.stdout[-3000:]
