"""The backends: what each one is, whether it works here (and if not, why), and the automatic choice.

A backend adapts arrays of one kind (host or device) for its kernels, allocates state beside them,
copies state to and from the host, and launches kernels by rule name. GPU libraries are imported
only inside probes and backend objects, so the package imports and runs on a machine without CUDA.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from gpuadam.arrays import DEVICE, HOST, ArrayInfo, aligned_zeros, is_simulator_array
from gpuadam.kernels import lean_rules

NAMES = ("numba-cuda", "cupy", "numba-cpu")
ENV_VAR = "GPUADAM_BACKEND"
#: Why numba-cuda cannot run when its package is missing, and what to do.
NUMBA_CUDA_MISSING = "not installed: pip install 'gpuadam[cuda]'"


def numba_cuda_version() -> str | None:
    """The installed ``numba-cuda`` package's version, or None.

    Numba itself still ships a deprecated ``numba.cuda`` that imports without numba-cuda but lacks
    what our kernels call (``get_current_device`` among others), so a successful ``import numba.cuda``
    proves nothing: only the distribution's metadata says which one is there.
    """
    try:
        return metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return None


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; ``reason`` says why not (or what it runs on)."""

    name: str
    available: bool
    reason: str


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NumbaCPU:
    name = "numba-cpu"
    kind = HOST

    def __init__(self) -> None:
        from gpuadam.kernels import lean_cpu, numba_cpu

        self._kernels = {**numba_cpu.KERNELS, **lean_cpu.KERNELS}
        self._sumsq = numba_cpu.sumsq

    def flat(self, x: np.ndarray) -> np.ndarray:
        # a subclass (np.matrix, np.memmap) as the plain array over the same memory: the loops
        # take nothing else, and a matrix would not even flatten to 1-D
        return np.asarray(x).reshape(-1)

    def zeros_like(self, x: np.ndarray, dtype: Any = None) -> np.ndarray:
        return aligned_zeros(x.size, x.dtype if dtype is None else dtype, like=x)

    def zeros(self, size: int, dtype: Any) -> np.ndarray:
        return aligned_zeros(size, dtype)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    def copy_from_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src.reshape(dst.shape))

    def launch(self, rule: str, arrays: tuple, c: tuple, *extra) -> None:
        self._kernels[rule](*arrays, c, *extra)

    def ready(self, rule: str) -> None:
        """Nothing to prepare on the host (the device backends copy tables here)."""

    def grad_sumsq(self, g: np.ndarray, fmt: int | None, inv_scale: float,
                   valid: np.ndarray | None = None) -> tuple[float, float]:
        """``(sum of squares, count of inf/NaN)`` of a 1-D gradient times ``inv_scale`` (half bits when
        ``fmt``), on the host; ``valid`` masks a FlatBuffer's padding (``FlatBuffer.valid_counts``)."""
        return self._sumsq(g, fmt, inv_scale, valid)


class NumbaCUDA:
    name = "numba-cuda"
    kind = DEVICE

    def __init__(self) -> None:
        from numba import cuda

        from gpuadam.kernels import lean_cuda, numba_cuda

        self._cuda = cuda
        self._kernels = numba_cuda
        self._lean = lean_cuda
        self._launch = numba_cuda.launch
        self._streams: dict[int, Any] = {}

    def flat(self, x: Any) -> Any:
        if is_simulator_array(x) or isinstance(x, self._cuda.devicearray.DeviceNDArray):
            return x.reshape(x.size)
        # sync=False: honouring the producer's stream here would synchronise the host.
        arr = self._cuda.as_cuda_array(x, sync=False)
        return arr.reshape(arr.size)

    def zeros_like(self, x: Any, dtype: Any = None) -> Any:
        size = int(np.prod(_shape(x)))
        return self._cuda.to_device(np.zeros(size, dtype=_dtype(x) if dtype is None else dtype))

    def to_host(self, x: Any) -> np.ndarray:
        return self.flat(x).copy_to_host()

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        self.flat(dst).copy_to_device(np.ascontiguousarray(src).reshape(-1))

    def launch(self, rule: str, arrays: tuple, c: tuple, *extra, stream: int | None = None) -> None:
        """Launch ``rule``; ``stream``: a CUDA stream handle (another library's, e.g. torch's current
        stream) to launch on instead of Numba's default stream."""
        on = 0 if not stream else self.external_stream(stream)
        lean = self._lean.LAUNCHERS.get(rule)
        if lean is not None:
            lean(arrays, c, *extra, stream=on)
            return
        self._launch(rule, arrays, c, *extra, stream=on)

    def ready(self, rule: str) -> None:
        """Whatever ``rule``'s launches need on the device, made now (before any step)."""
        if lean_rules.kind_of(rule) == "int8":
            self._lean.device_maps()

    def external_stream(self, handle: int) -> Any:
        """Numba's stream object for the CUDA stream ``handle`` (made once per handle)."""
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._streams[handle] = self._cuda.external_stream(handle)
        return stream

    def numba_stream(self) -> Any:
        """The stream of the device bookkeeping kernels: Numba's default, where the updates run."""
        return 0

    def zeros(self, size: int, dtype: Any) -> Any:
        return self._cuda.to_device(np.zeros(size, dtype))

    def copy_device(self, dst: Any, src: Any) -> None:
        """Copy device array ``src`` into ``dst`` (contiguous, any ``__cuda_array_interface__``), on the device."""
        self.flat(dst).copy_to_device(self.flat(src))

    def synchronize(self) -> None:
        """Wait for all work on the device (before a library that reads device memory outside any stream)."""
        self._cuda.synchronize()

    # --- the device-side bookkeeping (``on_device.DeviceSteps``)
    def device_array(self, host: np.ndarray) -> Any:
        return self._cuda.to_device(host)

    def write_device(self, dst: Any, index: int, value: float) -> None:
        dst[index : index + 1].copy_to_device(np.array([value], dst.dtype), stream=self.numba_stream())

    def _bookkeeping_stream(self, stream: int | None) -> Any:
        # the updates' stream: Numba's default, or the handle they are launched on (torch's current stream)
        return self.numba_stream() if not stream else self.external_stream(stream)

    def device_sumsq(self, g: Any, sums: Any, fmt: int | None, inv_scale: float, valid: Any,
                     stream: int | None = None) -> None:
        self._kernels.grad_sumsq(self.flat(g), sums, fmt, inv_scale, valid, stream=self._bookkeeping_stream(stream))

    def device_prepare(self, constants_fn: Any, sums: Any, hyper: tuple, inv_scale: float, max_norm: float,
                       skip_nonfinite: bool, lr: Any, group: int, steps: Any, slot: int, c32: Any, c64: Any,
                       norm: Any, skipped: Any, last: bool, host_step: int, stream: int | None = None) -> None:
        f64, i64 = np.float64, np.int64
        self._kernels.prepare(
            constants_fn, sums, hyper, f64(inv_scale), f64(max_norm), f64(skip_nonfinite), lr, i64(group), steps,
            i64(slot), c32, c64, norm, skipped, i64(last), i64(host_step), stream=self._bookkeeping_stream(stream),
        )


def _shape(x: Any) -> tuple:
    return tuple(x.shape)


def _dtype(x: Any) -> np.dtype:
    cai = getattr(x, "__cuda_array_interface__", None)
    return np.dtype(cai["typestr"]) if cai is not None else np.dtype(x.dtype)


class CuPy:
    name = "cupy"
    kind = DEVICE

    def __init__(self) -> None:
        import cupy

        from gpuadam.kernels import cupy_bookkeeping, cupy_elementwise, cupy_lean

        self._cupy = cupy
        self._launch = cupy_elementwise.launch
        self._lean = cupy_lean
        self._bookkeeping = cupy_bookkeeping
        self._external: dict[int, Any] = {}

    def flat(self, x: Any) -> Any:
        return self._cupy.asarray(x).reshape(-1)  # zero-copy for any __cuda_array_interface__

    def zeros_like(self, x: Any, dtype: Any = None) -> Any:
        return self._cupy.zeros(int(np.prod(_shape(x))), dtype=_dtype(x) if dtype is None else dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return self._cupy.asnumpy(self.flat(x))

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        self.flat(dst).set(np.ascontiguousarray(src).reshape(-1))

    def ready(self, rule: str) -> None:
        """Whatever ``rule``'s launches need on the device, made now (before any step): the int8
        tables. CuPy compiles each kernel itself at its first launch."""
        if lean_rules.kind_of(rule) == "int8":
            self._lean.device_maps()

    def launch(self, rule: str, arrays: tuple, c: tuple, *extra, stream: int | None = None) -> None:
        """Launch ``rule`` on CuPy's current stream, or on the CUDA stream ``stream`` (a handle)."""
        if not stream:
            self._launch_here(rule, arrays, c, *extra)
            return
        with self._external_stream(stream):
            self._launch_here(rule, arrays, c, *extra)

    def _launch_here(self, rule: str, arrays: tuple, c: tuple, *extra) -> None:
        lean = self._lean.LAUNCHERS.get(rule)  # the lean-state RawKernels, else the rules' kernels
        if lean is not None:
            lean(arrays, c, *extra)
        else:
            self._launch(rule, arrays, c, *extra)

    def _external_stream(self, handle: int) -> Any:
        """CuPy's stream object for the CUDA stream ``handle`` (made once per handle)."""
        external = self._external.get(handle)
        if external is None:
            external = self._external[handle] = self._cupy.cuda.ExternalStream(handle)
        return external

    def zeros(self, size: int, dtype: Any) -> Any:
        return self._cupy.zeros(size, dtype)

    def copy_device(self, dst: Any, src: Any) -> None:
        """Copy device array ``src`` into ``dst`` (contiguous, any ``__cuda_array_interface__``), on the device."""
        self.flat(dst)[...] = self.flat(src)

    def synchronize(self) -> None:
        """Wait for all work on the device (before a library that reads device memory outside any stream)."""
        self._cupy.cuda.Device().synchronize()

    # --- the device-side bookkeeping (``on_device.DeviceSteps``): CuPy's own kernels, on its
    # current stream like the updates
    def device_array(self, host: np.ndarray) -> Any:
        return self._cupy.asarray(host)

    def write_device(self, dst: Any, index: int, value: float) -> None:
        dst[index : index + 1].set(np.array([value], dst.dtype))

    def device_sumsq(self, g: Any, sums: Any, fmt: int | None, inv_scale: float, valid: Any,
                     stream: int | None = None) -> None:
        with self._external_stream(stream) if stream else contextlib.nullcontext():
            self._bookkeeping.grad_sumsq(self.flat(g), sums, fmt, inv_scale, valid)

    def device_prepare(self, constants_fn: Any, *args: Any, stream: int | None = None) -> None:
        with self._external_stream(stream) if stream else contextlib.nullcontext():
            self._bookkeeping.prepare(constants_fn, *args)


_FACTORIES = {"numba-cpu": NumbaCPU, "numba-cuda": NumbaCUDA, "cupy": CuPy}
_instances: dict[str, Any] = {}
_statuses: dict[str, BackendStatus] = {}


def _probe(name: str) -> BackendStatus:
    try:
        if name == "numba-cpu":
            import numba

            return BackendStatus(name, True, f"numba {numba.__version__} on {os.cpu_count()} CPUs")
        if name == "numba-cuda":
            if numba_cuda_version() is None:
                return BackendStatus(name, False, NUMBA_CUDA_MISSING)
            from numba import cuda

            if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
                return BackendStatus(name, True, "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
            if not cuda.is_available():
                try:
                    cuda.get_current_device()
                except Exception as exc:  # the driver's own words are the best reason
                    return BackendStatus(name, False, f"no usable CUDA device ({_first_line(exc)})")
                return BackendStatus(name, False, "no usable CUDA device")
            return BackendStatus(name, True, f"CUDA device {cuda.get_current_device().name!r}")
        if name == "cupy":
            import cupy

            count = cupy.cuda.runtime.getDeviceCount()
            if count < 1:
                return BackendStatus(name, False, "no CUDA device found")
            return BackendStatus(name, True, f"cupy {cupy.__version__} on {count} CUDA device(s)")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cupy":
            return BackendStatus(name, False, "not installed: pip install 'gpuadam[cupy]'")
        return BackendStatus(name, False, f"not installed ({_first_line(exc)})")
    except Exception as exc:  # any failure of a GPU stack means: not here, and why
        return BackendStatus(name, False, _first_line(exc))
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")


def status(name: str) -> BackendStatus:
    """The (cached) availability of backend ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")
    if name not in _statuses:
        _statuses[name] = _probe(name)
    return _statuses[name]


def available_backends() -> dict[str, BackendStatus]:
    """Every backend by name, whether it is available here, and why not when it is not."""
    return {name: status(name) for name in NAMES}


def get(name: str) -> Any:
    """The backend object ``name``; ``BackendUnavailable`` with the reason if it cannot run here."""
    st = status(name)
    if not st.available:
        raise BackendUnavailable(f"backend {name!r} is not available: {st.reason}")
    if name not in _instances:
        _instances[name] = _FACTORIES[name]()
    return _instances[name]


def device_backend(what: str) -> Any:
    """The GPU backend that allocates device buffers for ``what``: Numba CUDA, else CuPy (the
    automatic choice's order); ``BackendUnavailable`` naming ``what`` and both reasons otherwise."""
    for candidate in ("numba-cuda", "cupy"):
        if status(candidate).available:
            return get(candidate)
    reasons = "; ".join(f"{n}: {status(n).reason}" for n in ("numba-cuda", "cupy"))
    raise BackendUnavailable(f"{what}: no GPU backend can run here ({reasons})")


def choose(requested: str | None, info: ArrayInfo) -> Any:
    """The backend for arrays like ``info``: ``requested``, else ``$GPUADAM_BACKEND``, else automatic.

    Automatic: host arrays go to Numba CPU; device arrays (CuPy's included) to Numba CUDA, or to
    CuPy when Numba CUDA cannot run here. ``backend="cupy"`` asks for CuPy explicitly.
    """
    name = requested if requested not in (None, "auto") else os.environ.get(ENV_VAR, "auto") or "auto"
    source = "backend=" if requested not in (None, "auto") else f"${ENV_VAR}"
    if name == "auto":
        if info.kind == HOST:
            return get("numba-cpu")
        return device_backend("the params are CUDA device arrays")
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r} (given as {source}); expected one of {', '.join(NAMES)} or 'auto'")
    backend = get(name)
    if backend.kind != info.kind:
        where = "host (NumPy)" if info.kind == HOST else "CUDA device"
        raise ValueError(
            f"backend {name!r} (given as {source}) runs on {backend.kind} arrays, but the params are {where} arrays"
        )
    return backend
