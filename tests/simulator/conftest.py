"""These tests run Numba CUDA kernels in Numba's CUDA simulator, in their own process.

``NUMBA_ENABLE_CUDASIM=1`` must be set before ``numba.cuda`` is first imported, so the main test
run does not collect this folder; ``tests/test_simulator.py`` runs it in a subprocess.
"""

import os

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["test_*.py"]
