"""tests/gpu, the GPU kit: every kernel on a real GPU, and the same test bodies in Numba's CUDA
simulator where it can run them, so the kit cannot rot between the rare runs on a GPU.

On a GPU (``scripts/gpu_check.sh``) both GPU backends run at sizes that loop over more than one
grid of blocks. Under ``NUMBA_ENABLE_CUDASIM=1`` (``scripts/gpu_check.sh --dry-run``, which
``tests/test_gpu_kit.py`` runs in CI) only numba-cuda runs, at tiny sizes, in blocks of 32
threads; what the simulator cannot do (CuPy, torch CUDA tensors, streams, graphs, the driver's
register counts, sizes past 2**31 bytes) skips there with the reason ``GPU only``. With neither
a GPU nor the simulator every test skips, saying so.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # family_cases, helpers
sys.path.insert(0, str(Path(__file__).parent))  # gpukit

from gpukit import SIM, backends_here, gpu_here  # noqa: E402


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_here())


def _case_index(item) -> int:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("index", -1) if callspec is not None else -1


#: Modules run after the others, in this order: the biggest allocations once the rest is proven;
#: the register check over the kernels every other test loaded.
LAST = {"test_gpu_big.py": 1, "test_gpu_registers.py": 2}


def pytest_collection_modifyitems(config, items):
    # a rule's case on both backends one after the other: the reference trajectory is computed once
    where = [k for k, item in enumerate(items) if item.path.name == "test_gpu_rules.py"]
    ordered = sorted((items[k] for k in where), key=lambda item: (item.originalname, _case_index(item)))
    for k, item in zip(where, ordered):
        items[k] = item
    items.sort(key=lambda item: LAST.get(item.path.name, 0))


@pytest.fixture(autouse=True)
def _gpu_or_simulator():
    """Skip without a GPU (and outside the simulator); in the simulator, small launches: blocks of
    16 threads and a grid of 2 blocks, so a 150-element tensor still loops over its grid stride."""
    if not SIM:
        if not gpu_here():
            pytest.skip("needs a CUDA GPU, and this machine has none: scripts/gpu_check.sh runs tests/gpu "
                        "on a GPU, and in Numba's CUDA simulator with --dry-run")
        yield
        return
    from gpuadam.kernels import numba_cuda

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_cuda, "THREADS", 16)
        patch.setattr(numba_cuda, "_max_blocks", [2])
        yield


@pytest.fixture
def real_gpu():
    """For what only a GPU can do: skips in the simulator."""
    if SIM:
        pytest.skip("GPU only: Numba's CUDA simulator has no CuPy, torch CUDA, streams, graphs or driver")


def pytest_report_header(config):
    where = "Numba's CUDA simulator (numba-cuda only, tiny sizes)" if SIM else (
        "a CUDA GPU" if gpu_here() else "no GPU: every test skips")
    return f"tests/gpu runs on {where}; backends {', '.join(backends_here())}; GPUADAM_BACKEND=" \
           f"{os.environ.get('GPUADAM_BACKEND', '')!r}"
