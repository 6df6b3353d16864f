"""Our implementations: ``Adam.step``, ``FlatBuffer``, ``adam_step`` and the raw kernel launch."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuadam.bench.cases import (
    BackendCase,
    Case,
    Implementation,
    device_of,
    half_format_code,
    to_backend,
)
from gpuadam.bench.ceiling import Ceiling
from gpuadam.bench.problems import (
    STATE_NAMES,
    VERIFY_STEPS,
    OptimizerSpec,
    Problem,
    adam_kwargs,
)


class OursOptimizer(Implementation):
    """``gpuadam.Adam`` / ``AdamW`` and ``opt.step(grads)``: validation, constants, dispatch, kernel."""

    group = "ours"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.device = device_of(backend)
        self.name = f"gpuadam {backend} Adam.step"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OptimizerCase(self.backend, problem, sets)


def _optimizer_class(spec: OptimizerSpec) -> type:
    import gpuadam

    return gpuadam.AdamW if spec.name == "adamw" else gpuadam.Adam


class _OptimizerCase(BackendCase):
    state_dtype: str | None = None  # gpuadam.Adam's state_dtype (None: the params' own)

    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        super().__init__(backend, problem, sets)
        self.opts = [self.optimizer(params) for params in self.params]

    def optimizer(self, params: list) -> Any:
        problem = self.problem
        return _optimizer_class(problem.spec)(
            params, backend=self.backend, master_weights=problem.master, half_format=self.half_format,
            state_dtype=self.state_dtype, **adam_kwargs(problem.spec.hyper),
        )

    def step(self, k: int) -> None:
        self.opts[k].step(self.grads[k])

    def state(self) -> dict[str, np.ndarray]:
        opt, problem = self.opts[0], self.problem
        out = {"p": self._host(self.params[0], problem.dtype)}
        for name, short in STATE_NAMES.items():
            if name in opt.state[0]:
                out[short] = self._host([s[name] for s in opt.state], problem.storage(short))
        return out


class OursFlatBuffer(OursOptimizer):
    """``gpuadam.Adam(buffer.views)`` on a ``gpuadam.FlatBuffer``: one launch for all tensors."""

    launches = "one"

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} FlatBuffer"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _FlatCase(self.backend, problem, sets)


class _FlatCase(_OptimizerCase):
    def __init__(self, backend: str, problem: Problem, sets: int) -> None:
        import gpuadam

        BackendCase.__init__(self, backend, problem, 0)  # the buffers below are the arrays
        self.sets = sets
        device = "cpu" if backend == "numba-cpu" else "cuda"
        dtype = np.uint16 if self.bits16 else problem.dtype
        self.buffers = []
        for _ in range(sets):
            pbuf = gpuadam.FlatBuffer(list(problem.sizes), dtype, device)
            gbuf = pbuf.zeros_like()
            for buf, x in ((pbuf, problem.p0), (gbuf, problem.g1)):
                for view, part in zip(buf.views, problem.split(x)):
                    self.be.copy_from_host(view, self.storable(part))
            self.buffers.append((pbuf, gbuf))
            self.params.append(pbuf.views)
            self.grads.append(gbuf.views)
        self.opts = [self.optimizer(params) for params in self.params]


class OursFunctional(OursOptimizer):
    """``gpuadam.adam_step`` on caller-owned arrays: validation and constants on every call."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} adam_step"

    def unavailable(self, problem: Problem) -> str | None:
        if problem.half:
            return "adam_step takes float32/float64 arrays (half params need gpuadam.Adam's state)"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _RawCase(self.backend, problem, sets, functional=True)


class OursLaunch(OursOptimizer):
    """The backend's kernel launch with precomputed constants: the step minus the host overhead."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"gpuadam {backend} launch"

    def setup(self, problem: Problem, sets: int) -> Case:
        return _RawCase(self.backend, problem, sets, functional=False)


class _RawCase(BackendCase):
    """State arrays owned here; steps through ``adam_step`` or straight through ``be.launch``.

    Half params launch the ``/half`` kernel as ``Adam`` does: on the 16-bit patterns, with the
    float32 master in front and the half param last when there are master weights.
    """

    def __init__(self, backend: str, problem: Problem, sets: int, functional: bool) -> None:
        super().__init__(backend, problem, sets)
        self.functional = functional
        be, spec, master = self.be, problem.spec, problem.master
        state_dtype = np.float32 if master else np.uint16 if self.bits16 else problem.dtype
        self.state_arrays = [[[be.zeros_like(p, state_dtype) for _ in spec.state] for p in params]
                             for params in self.params]
        self.masters = [[to_backend(be, x.astype(np.float32)) for x in problem.split(problem.p0)]
                        for _ in range(sets)] if master else None
        self.steps = [0] * sets
        h = problem.spec.hyper
        self.kwargs = {k: v for k, v in adam_kwargs(h).items() if k != "amsgrad"}
        # Constants of the verified steps, then the last of them reused: the launch must not pay for
        # them, and the kernel's cost does not depend on their values.
        self.constants = [h.constants(t, problem.compute_dtype) for t in range(1, VERIFY_STEPS + 1)]
        self.rule = f"{spec.rule}/half" if problem.half else spec.rule
        # per set and tensor: the half kernels' (format, stochastic, seed, counter, index base), half_param
        self.extra: list = []
        self.launch_args = []
        for k, (params, grads, states) in enumerate(zip(self.params, self.grads, self.state_arrays)):
            args, extra = [], []
            for j, (p, g, st) in enumerate(zip(params, grads, states)):
                first = be.flat(self.masters[k][j]) if master else self.kernel_view(p)
                args.append((first, self.kernel_view(g), *(self.kernel_view(s) for s in st)))
                rounding = (half_format_code(problem.dtype), 0, 0, 0, 0)
                extra.append((rounding, self.kernel_view(p)) if problem.half else ())
            self.launch_args.append(args)
            self.extra.append(extra)

    def step(self, k: int) -> None:
        t = self.steps[k] = self.steps[k] + 1
        if self.functional:
            from gpuadam import adam_step

            for p, g, st in zip(self.params[k], self.grads[k], self.state_arrays[k]):
                adam_step(p, g, *st, step=t, backend=self.backend, **self.kwargs)
        else:
            launch, rule = self.be.launch, self.rule
            c = self.constants[min(t, VERIFY_STEPS) - 1]
            for arrays, extra in zip(self.launch_args[k], self.extra[k]):
                launch(rule, arrays, c, *extra)

    def state(self) -> dict[str, np.ndarray]:
        problem = self.problem
        out = {"p": self._host(self.params[0], problem.dtype)}
        for j, name in enumerate(problem.spec.state):
            out[name] = self._host([st[j] for st in self.state_arrays[0]], problem.storage(name))
        if self.masters is not None:
            out["w"] = self._host(self.masters[0])
        return out


def our_implementations(backend: str) -> list[Implementation]:
    return [Ceiling(backend), OursOptimizer(backend), OursLaunch(backend)]
