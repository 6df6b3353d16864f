"""These tests run Numba CUDA kernels in Numba's CUDA simulator, in their own process.

``NUMBA_ENABLE_CUDASIM=1`` must be set before ``numba.cuda`` is first imported, so the main test
run does not collect this folder; ``tests/test_simulator.py`` runs each file in a subprocess.
"""

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def small_launches():
    """Every simulator test launches blocks of 32 threads, at most 4 of them: the simulator runs
    each thread as a Python thread, and 256-thread blocks cost seconds per step (the real launch
    configuration is compiled for sm_90 by the machine-code tests). 32 still halves five times in
    the tree reduction, and 4 blocks make a 300-element tensor loop over its grid stride."""
    from gpuadam.kernels import numba_cuda

    # its own MonkeyPatch: a test's monkeypatch.undo() must not restore the big launches midway
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_cuda, "THREADS", 32)
        patch.setattr(numba_cuda, "_max_blocks", [4])
        yield
