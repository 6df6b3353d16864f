"""Backend registry: availability with reasons, the automatic choice, forced choices and their errors."""

import numpy as np
import pytest

import gpuadam
from gpuadam import backends


def test_every_backend_reported_with_a_reason():
    report = gpuadam.available_backends()
    assert set(report) == {"numba-cuda", "cupy", "numba-cpu"}
    assert report["numba-cpu"].available
    for st in report.values():
        assert st.reason


def test_host_arrays_go_to_numba_cpu():
    assert gpuadam.Adam([np.zeros(3, np.float32)]).backend == "numba-cpu"


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        gpuadam.Adam([np.zeros(3, np.float32)], backend="triton")


def test_env_var_forces_a_choice(monkeypatch):
    monkeypatch.setenv("GPUADAM_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(given as \$GPUADAM_BACKEND\)"):
        gpuadam.Adam([np.zeros(3, np.float32)])
    monkeypatch.setenv("GPUADAM_BACKEND", "numba-cpu")
    assert gpuadam.Adam([np.zeros(3, np.float32)]).backend == "numba-cpu"


@pytest.mark.parametrize("name", ["numba-cuda", "cupy"])
def test_forcing_a_gpu_backend_on_host_arrays_says_why(name):
    st = gpuadam.available_backends()[name]
    with pytest.raises((backends.BackendUnavailable, ValueError)) as info:
        gpuadam.Adam([np.zeros(3, np.float32)], backend=name)
    if not st.available:
        assert st.reason in str(info.value)
    else:
        assert "host" in str(info.value)


def test_a_gpu_stack_that_raises_on_import_is_reported_unavailable(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name in ("cupy", "numba.cuda") or (name == "numba" and args and args[2] and "cuda" in args[2]):
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(backends, "_statuses", {})
    report = gpuadam.available_backends()
    for name in ("numba-cuda", "cupy"):
        assert not report[name].available
        assert "libcudart" in report[name].reason
    assert report["numba-cpu"].available


def _without_numba_cuda(monkeypatch):
    """What `pip install gpuadam` (no [cuda]) leaves: Numba's own deprecated numba.cuda, no numba-cuda."""
    from importlib import metadata

    real = metadata.version

    def version(dist):
        if dist == "numba-cuda":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(backends.metadata, "version", version)
    monkeypatch.setattr(backends, "_statuses", {})


@pytest.mark.parametrize("simulator", ["1", None])
def test_numba_cuda_without_its_package_is_not_installed(monkeypatch, simulator):
    """Numba's built-in numba.cuda imports, even in the simulator, but is not numba-cuda: the
    probe asks the package metadata, and says how to install it."""
    _without_numba_cuda(monkeypatch)
    if simulator:
        monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", simulator)
    st = gpuadam.available_backends()["numba-cuda"]
    assert not st.available
    assert st.reason == "not installed: pip install 'gpuadam[cuda]'"


def test_numba_cuda_in_the_simulator_is_available_when_installed(monkeypatch):
    if backends.numba_cuda_version() is None:
        pytest.skip("numba-cuda is not installed (pip install 'gpuadam[cuda]')")
    monkeypatch.setattr(backends, "_statuses", {})
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert gpuadam.available_backends()["numba-cuda"].available


def test_a_missing_cupy_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backends, "_statuses", {})
    assert gpuadam.available_backends()["cupy"].reason == "not installed: pip install 'gpuadam[cupy]'"
