"""Optimizer classes: parameter groups, state, step counts, ``step()`` and ``state_dict()``.

The shared machinery lives in ``Optimizer``; an optimizer class only names its hyperparameter
record, its state arrays and the kernel rule to launch. ``step()`` validates every gradient and
every group's hyperparameters before the first kernel runs, so a refused step changes nothing.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from gpuadam import backends, checkpoint, flat, lean, sharded_checkpoint
from gpuadam.arrays import (
    DEVICE,
    ArrayInfo,
    check_grad_count,
    check_like,
    check_param,
    describe,
    first_overlap,
    span,
)
from gpuadam.flat import FlatBuffer
from gpuadam.hyper import Hyper, check_count, check_flag, check_positive
from gpuadam.kernels.lowp import BFLOAT16
from gpuadam.kernels.rules import RULES, grad_factor
from gpuadam.on_device import DeviceSteps
from gpuadam.precision import check_half_format, widen_half


class Launch(NamedTuple):
    """One kernel launch of a step: its group, arrays, kernel, compute dtype, params, half format,
    step slot (the params' shared step count), and the valid counts of a FlatBuffer's granules."""

    group: int
    arrays: tuple
    rule: str
    dtype: np.dtype
    params: range
    fmt: int | None
    param: Any  # the param's kernel view (the half param, which a master-weights kernel also writes)
    slot: int
    valid: Any  # None, or per 16 elements how many are not padding (FlatBuffer.valid_counts)


class Optimizer:
    """Base class: subclasses set ``hyper_class`` and implement ``rule`` (and ``state_init`` when
    some state does not start at zero); the state arrays are the rule's.

    Options every optimizer takes: ``skip_nonfinite=True`` makes a step whose gradients hold an inf
    or NaN change nothing (not even the step count) and counts it in ``steps_skipped``;
    ``capturable=True`` (GPU) keeps step counts, lr and that flag on the device and never
    synchronises with the host in ``step()``, so the step can be captured in a CUDA graph.
    """

    hyper_class: type = Hyper

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        backend: str = "auto",
        *,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
        state_dtype: str | None = None,
    ) -> None:
        self._lean_format = lean.check_state_dtype(state_dtype)
        self.skip_nonfinite = check_flag("skip_nonfinite", skip_nonfinite)
        self.capturable = check_flag("capturable", capturable)
        self.master_weights = check_flag("master_weights", master_weights)
        self.stochastic_rounding = check_flag("stochastic_rounding", stochastic_rounding)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
        self.seed = int(seed)
        declared = check_half_format(half_format)
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = [self._make_group(g) for g in _groups(params)]
        self._params = [p for group in self.param_groups for p in group["params"]]
        if not self._params:
            raise ValueError("params: expected at least one array, got an empty list")
        # the indices of each group's params among all params (fixed at construction, like the state)
        ends = np.cumsum([len(g["params"]) for g in self.param_groups]).tolist()
        self._ranges = [range(end - len(g["params"]), end) for g, end in zip(self.param_groups, ends)]
        checked = [check_param(i, p, declared) for i, p in enumerate(self._params)]
        infos = [info for info, _ in checked]
        self._formats: list[int | None] = [fmt for _, fmt in checked]
        for i, info in enumerate(infos):
            if info.kind != infos[0].kind:
                raise ValueError(
                    f"param {i}: expected a {infos[0].kind} array like param 0, got a {info.kind} array"
                )
        self._check_precision_options(infos)
        self._infos: list[ArrayInfo] = infos
        self._spans = [span(p) for p in self._params]
        clash = first_overlap(self._spans)
        if clash is not None:
            i, j = clash
            same = "is the same array as" if self._spans[i] == self._spans[j] else "overlaps in memory with"
            raise ValueError(f"param {j} {same} param {i}: each param must own its memory, or a step "
                             "would update it twice")
        # the params' spans sorted by address, to find a gradient that overlaps one of them
        self._span_order = sorted(range(len(self._spans)), key=lambda i: self._spans[i][0])
        self._span_starts = [self._spans[i][0] for i in self._span_order]
        self._keeps_padding_cache: dict[Any, bool] = {}
        self._hyper_cache: dict[int, tuple] = {}
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        self._backend = backends.choose(backend, infos[0])
        be = self._backend
        self._lean = self._lean_kinds(hypers)
        self._flat = [self._kernel_view(p, fmt) for p, fmt in zip(self._params, self._formats)]
        # state[i]: name -> 1-D state array of param i, allocated here, never in step(). A group whose
        # params are the views of one FlatBuffer gets its state as one allocation per name, and
        # state[i] are views into it: the group then steps with one launch. Half params keep
        # float32 state and a float32 "master" copy with master_weights, half state without.
        self.state: list[dict[str, Any]] = []
        self._flat_groups: dict[int, tuple[FlatBuffer, dict[str, Any]]] = {}
        for gi, (group, hyper, indices) in enumerate(zip(self.param_groups, hypers, self._ranges)):
            fmt = self._formats[indices.start]
            names = self._state_names(hyper, fmt)
            # lean state is blocked per tensor: a FlatBuffer's views then step one by one
            buf = flat.owner(group["params"]) if self._lean_format is None else None
            if buf is None:
                self.state.extend(self._new_lean_state(p, fmt, lean.kernel(self.rule(hyper), self._lean[i]))
                                  if self._lean[i] else
                                  self._new_state(p, fmt, names) for i, p in zip(indices, group["params"]))
            else:
                whole = self._new_state(buf.data, fmt, names)
                self._flat_groups[gi] = (buf, whole)
                for offset, p in zip(buf.offsets, group["params"]):
                    size = int(np.prod(_shape_of(p)))
                    self.state.append({n: a[offset : offset + size] for n, a in whole.items()})
        self._fill_initial_state(hypers)
        self._steps = [0] * len(self._params)
        # One lock per optimizer: step(), state_dict() and load_state_dict() from several threads run
        # one at a time (each step counted once); two optimizers still run side by side.
        self._lock = threading.RLock()
        self._claimed = False  # whether this optimizer owns its params' memory (see _claim)
        self._displaced: tuple | None = None  # (the newer owner, its param, ours) once another took over
        self._calls = 0  # step() calls that reached the kernels: the stochastic rounding counter
        # set by shard(): this optimizer steps a slice of a larger buffer (gpuadam.distributed)
        self._index_base = 0
        self._reduce_grad_stats: Any = None
        self._shard_valid: Any = None
        self.last_step_launches = 0
        self._steps_skipped = 0
        self._last_grad_norm: Any = None
        # GPU bookkeeping on the device: needed to skip steps or to never synchronise (capturable),
        # and used for clipping; its step counts are the truth when ``_device_counts``.
        self._device: DeviceSteps | None = None
        device_counts = self.skip_nonfinite or self.capturable
        if be.kind == DEVICE:
            lrs = [float(g["lr"]) for g in self.param_groups] if self.capturable else None
            self._device = DeviceSteps(len(self.param_groups), lrs, be)
        elif self.capturable:
            raise ValueError("capturable=True keeps the step count on the GPU: it needs device arrays, "
                             "got host arrays")
        self._device_counts = self._device is not None and device_counts
        self._valid_on_device: dict[int, Any] = {}
        if self._device is not None:
            for gi, (buf, _) in self._flat_groups.items():
                self._valid_on_device[gi] = self._device.upload(buf.valid_counts())
        self._set_slots(self._steps)

    # --- what a subclass defines -------------------------------------------------------------
    def state_names(self, hyper: Any) -> tuple[str, ...]:
        """PyTorch's names of the state arrays ``hyper`` needs, in the kernel's order (its rule's)."""
        return RULES[self.rule(hyper)].state_names

    def rule(self, hyper: Any) -> str:
        raise NotImplementedError

    def state_init(self, hyper: Any) -> dict[str, float]:
        """Start values of the state arrays that do not start at zero, by name (none by default)."""
        return {}

    def _fill_initial_state(self, hypers: list) -> None:
        """Set the state ``state_init`` starts away from zero; a flat group's whole buffers (padding
        included: a zero gradient still moves nothing there)."""
        for gi, (hyper, indices) in enumerate(zip(hypers, self._ranges)):
            init = {n: v for n, v in self.state_init(hyper).items() if v != 0}
            fused = self._flat_groups.get(gi)
            targets = [] if not init else [fused[1]] if fused else self.state[indices.start : indices.stop]
            for state in targets:
                for name, value in init.items():
                    info = describe(state[name])
                    if info.dtype.kind != "f":
                        raise ValueError(f"state {name!r} starts at {value}: only float state can start "
                                         f"away from zero, got {info.dtype}")
                    self._backend.copy_from_host(state[name], np.full(info.shape, value, info.dtype))

    # --- storage precision -------------------------------------------------------------------
    def _check_precision_options(self, infos: list[ArrayInfo]) -> None:
        if self.stochastic_rounding and self.capturable:
            # The counter that draws the random bits is a kernel argument: a captured graph would
            # replay it unchanged, rounding every step with the same bits (a bias, not noise).
            raise ValueError("stochastic_rounding with capturable=True: a captured CUDA graph would replay "
                             "the same random bits every step; use master_weights, or no capture")
        for i, (info, fmt) in enumerate(zip(infos, self._formats)):
            if self.master_weights and fmt is None:
                raise ValueError(f"param {i}: master_weights is for float16/bfloat16 params, got {info.dtype}")
            if self.stochastic_rounding and (fmt != BFLOAT16 or self.master_weights):
                raise ValueError(f"param {i}: stochastic_rounding is for bfloat16 params without master "
                                 f"weights, got {info.dtype}{' with master weights' if self.master_weights else ''}")
        for gi, indices in enumerate(self._ranges):
            kinds = {self._formats[i] for i in indices}
            if len(kinds) > 1:
                raise ValueError(f"param group {gi}: mixes half-precision params with float32/float64 ones; "
                                 "give each precision its own group")

    def _state_names(self, hyper: Any, fmt: int | None) -> tuple[str, ...]:
        names = self.state_names(hyper)
        return (*names, "master") if fmt is not None and self.master_weights else names

    def _kernel_view(self, x: Any, fmt: int | None) -> Any:
        flat_view = self._backend.flat(x)
        return flat_view if fmt is None else flat_view.view(np.uint16)

    def _new_state(self, p: Any, fmt: int | None, names: tuple[str, ...]) -> dict[str, Any]:
        be = self._backend
        if fmt is None or not self.master_weights:
            return {n: self._kernel_view(be.zeros_like(p), fmt) for n in names}
        state = {n: be.zeros_like(p, np.float32) for n in names}
        bits = np.ascontiguousarray(be.to_host(p)).reshape(-1).view(np.uint16)
        be.copy_from_host(state["master"], widen_half(bits, fmt))
        return state

    def _lean_kinds(self, hypers: list) -> list[str | None]:
        """Per param, the format its moments are kept in (``lean``), after checking it can be."""
        kind = self._lean_format
        if kind is None:
            return [None] * len(self._params)
        for gi, hyper in enumerate(hypers):
            refusal = lean.rule_refusal(kind, self.rule(hyper))
            if refusal:
                raise ValueError(f"param group {gi}: {refusal}")
        for i, (info, fmt) in enumerate(zip(self._infos, self._formats)):
            if (fmt is None and info.dtype != np.float32) or (fmt is not None and not self.master_weights):
                raise ValueError(f"param {i}: state_dtype={kind!r} is for float32 params, or half params with "
                                 f"master_weights=True, got {info.dtype}")
        return [lean.kind_for(kind, int(np.prod(info.shape))) for info in self._infos]

    def _new_lean_state(self, p: Any, fmt: int | None, kernel: str) -> dict[str, Any]:
        shape = _shape_of(p)
        kind = lean.kind_of(kernel)
        # half params: float32 master weights beside the lean moments (master_weights, checked)
        state = {} if fmt is None else self._new_state(p, fmt, ("master",))
        be = self._backend
        be.ready(kernel)
        for name in lean.NAMES[kind]:
            dtype, state_shape = lean.spec(kind, name, shape)
            # the codes and bits lie like the param (its page offset on the host); an absmax is small
            state[name] = (be.zeros(int(np.prod(state_shape)), dtype) if name.endswith("_absmax")
                           else be.zeros_like(be.flat(p), dtype))
        return state

    def _param_state_names(self, i: int, hyper: Any) -> tuple[str, ...]:
        """The names of param ``i``'s state arrays (its lean format's, or its rule's)."""
        kind = self._lean[i]
        if not kind:
            return self._state_names(hyper, self._formats[i])
        return (*lean.NAMES[kind], "master") if self._formats[i] is not None else lean.NAMES[kind]

    def state_shape(self, i: int, name: str) -> tuple:
        """The shape of param ``i``'s state array ``name`` in ``state_dict()`` (the param's, but a
        lean absmax: one per block)."""
        return self._state_spec(i, name)[1]

    def _state_spec(self, i: int, name: str) -> tuple[np.dtype, tuple]:
        kind = self._lean[i]
        if kind and name in lean.NAMES[kind]:
            return lean.spec(kind, name, self._infos[i].shape)
        return self.state_dtype(i), self._infos[i].shape

    @property
    def state_format(self) -> str | None:
        """The ``state_dtype`` the optimizer was built with: None, ``"bfloat16"`` or ``"int8"``."""
        return self._lean_format

    @property
    def state_nbytes(self) -> int:
        """Bytes of all state arrays (codes, absmax, moments, master weights; a FlatBuffer group's
        whole allocations, padding included)."""
        total = 0
        flat_params = set()
        for gi, (_, whole) in self._flat_groups.items():
            total += sum(int(a.nbytes) for a in whole.values())
            flat_params.update(self._ranges[gi])
        for i, state in enumerate(self.state):
            if i not in flat_params:
                total += sum(int(a.nbytes) for a in state.values())
        return total

    def state_dtype(self, i: int) -> np.dtype:
        """The dtype of param ``i``'s state as ``state_dict()`` gives it."""
        return np.dtype(np.float32) if self.master_weights else self._infos[i].dtype

    def _state_bits(self, i: int) -> np.dtype:
        """The dtype of param ``i``'s state as the kernels hold it (half state as uint16 bits)."""
        half = self._formats[i] is not None and not self.master_weights
        return np.dtype(np.uint16) if half else self.state_dtype(i)

    def _host_state(self, i: int, a: Any, name: str = "") -> np.ndarray:
        dtype, shape = self._state_spec(i, name)
        return self._backend.to_host(a).view(dtype).reshape(shape)

    def _rule_name(self, hyper: Any, fmt: int | None) -> str:
        rule = self.rule(hyper)
        return rule if fmt is None else f"{rule}/half"

    # --- public ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend in use: ``"numba-cuda"``, ``"cupy"`` or ``"numba-cpu"``."""
        return self._backend.name

    @property
    def steps(self) -> list[int]:
        """Steps taken, per param (read from the GPU when it keeps the count: that synchronises)."""
        with self._lock:
            if self._device_counts:
                by_slot = self._device.read_steps()
                return [by_slot[slot] for slot in self._slot_of]
            return list(self._steps)

    @property
    def steps_skipped(self) -> int:
        """Steps skipped for a non-finite gradient (``skip_nonfinite``); on a GPU, reading synchronises."""
        if self._device_counts:
            return self._device.read_skipped()
        return self._steps_skipped

    @property
    def device_lr(self) -> Any:
        """``capturable``: each group's lr as the step reads it, a float64 device array. A replayed
        CUDA graph runs no ``step()`` to upload a changed ``param_groups`` lr: write this instead."""
        if not self.capturable:
            raise AttributeError("device_lr: only a capturable optimizer keeps its lr on the device")
        return self._device.lr

    @property
    def last_grad_norm(self) -> Any:
        """Norm of all gradients at the last step that computed it (``max_grad_norm``/``skip_nonfinite``):
        a float on the CPU, a 1-element device array on a GPU (reading it is your synchronisation)."""
        if self._device is not None and self._last_grad_norm is not None:
            return self._device.norm
        return self._last_grad_norm

    def shard(self, index_base: int, reduce_grad_stats: Any, valid: np.ndarray | None = None) -> None:
        """Make this optimizer step one slice of a buffer sharded across processes (the hook of
        ``gpuadam.distributed``). ``index_base``: the slice's first element's index in the whole
        buffer, so stochastic rounding draws each element's bits by its global index.
        ``reduce_grad_stats(stats)``: sums, in place, a float64 array ``[sum of squares, count of
        inf/NaN]`` of this slice's gradients over all slices (a host or device array, as the
        optimizer's arrays), so clipping and ``skip_nonfinite`` act on the global figures.
        ``valid``: for an optimizer of one 1-D param, the slice's ``FlatBuffer.valid_counts()``
        (per 16 elements, how many are not padding), so those figures skip the padding."""
        if isinstance(index_base, bool) or not isinstance(index_base, (int, np.integer)) or index_base < 0:
            raise ValueError(f"index_base: expected an integer >= 0, got {index_base!r}")
        if not callable(reduce_grad_stats):
            raise TypeError(f"reduce_grad_stats: expected a callable, got {type(reduce_grad_stats).__name__}")
        if valid is not None:
            valid = np.ascontiguousarray(valid, np.uint8)
            size = int(np.prod(self._infos[0].shape))
            if len(self._params) != 1 or valid.ndim != 1 or valid.size * flat.ALIGN != size:
                raise ValueError(f"valid: expected the valid counts of one param's {flat.ALIGN}-element granules, "
                                 f"got {valid.size} counts for {len(self._params)} params")
            valid = self._device.upload(valid) if self._device is not None else valid
        self._index_base = int(index_base)
        self._reduce_grad_stats = reduce_grad_stats
        self._shard_valid = valid

    def step(
        self, grads: Sequence[Any], *, grad_scale: float | None = None, max_grad_norm: float | None = None
    ) -> None:
        """Update every parameter and its state in place from ``grads`` (aligned with the params).

        ``grad_scale``: the gradients are ``grad_scale`` times the true ones (loss scaling); the kernel
        multiplies them by ``1 / grad_scale`` (exact for the powers of two loss scalers use) and leaves
        the arrays in memory as they are; a gradient that is inf or NaN once unscaled counts as
        non-finite. ``max_grad_norm``: clip by the norm of all gradients together, as
        ``torch.nn.utils.clip_grad_norm_`` before the step (of the unscaled gradients). Safe to call
        from several threads: the calls run one at a time.
        """
        with self._lock:
            self._step(grads, grad_scale, max_grad_norm)

    def _step(self, grads: Sequence[Any], grad_scale: float | None, max_grad_norm: float | None) -> None:
        check_grad_count(len(self._infos), grads)
        inv_scale = 1.0 if grad_scale is None else 1.0 / check_positive("grad_scale", grad_scale)
        max_norm = 0.0 if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        hypers = [self._hyper(group, gi) for gi, group in enumerate(self.param_groups)]
        reduce = max_norm > 0.0 or self.skip_nonfinite
        units = self._plan(grads, hypers)
        if self._displaced is not None:
            _check_owner(self)
        if not self._claimed:
            _claim(self)  # the last check: from here on, nothing can refuse
        if self._device is not None and (reduce or self._device_counts):
            self._step_on_device(units, hypers, inv_scale, max_norm, reduce)
            return
        be = self._backend
        self._calls += 1
        grad_mul = inv_scale
        if reduce:
            sumsq = nonfinite = 0.0
            for unit in units:
                s, bad = be.grad_sumsq(unit.arrays[1], unit.fmt, inv_scale, unit.valid)
                sumsq += s
                nonfinite += bad
            if self._reduce_grad_stats is not None:
                stats = np.array([sumsq, nonfinite], np.float64)
                self._reduce_grad_stats(stats)
                sumsq, nonfinite = float(stats[0]), float(stats[1])
            norm, grad_mul, skip = grad_factor(sumsq, nonfinite, inv_scale, max_norm, float(self.skip_nonfinite))
            self._last_grad_norm = norm
            if skip:
                self._steps_skipped += 1
                self.last_step_launches = 0
                return
        constants: dict[tuple, tuple] = {}
        for unit in units:
            step = self._steps[unit.params[0]] + 1
            key = (unit.group, step, unit.dtype)
            c = constants.get(key)
            if c is None:
                c = constants[key] = hypers[unit.group].constants(step, unit.dtype, grad_mul)
            be.launch(unit.rule, unit.arrays, c, *self._rounding(unit))
            for i in unit.params:
                self._steps[i] = step
        self.last_step_launches = len(units)

    def _rounding(self, unit: Launch) -> tuple:
        # the half kernels' last arguments: (format, stochastic, seed, counter for the random bits,
        # index of the first element in the whole buffer) and the half param; before them, bfloat16
        # moments' own (stochastic, seed, counter)
        extra = ((1, self.seed, self._calls),) if lean.kind_of(unit.rule) == "bfloat16" else ()
        if unit.fmt is None:
            return extra
        return (*extra, (unit.fmt, int(self.stochastic_rounding), self.seed, self._calls, self._index_base),
                unit.param)

    def _plan(self, grads: Sequence[Any], hypers: list) -> list[Launch]:
        """Check every gradient and group, and list the launches.

        A group over one FlatBuffer, stepped with the views of a FlatBuffer of the same layout, is one
        launch over the whole buffers when its params share one step count and its rule keeps the
        zero padding at zero; anything else is one launch per tensor.
        """
        units = []
        grad_spans = []
        for gi, (hyper, indices) in enumerate(zip(hypers, self._ranges)):
            fmt = self._formats[indices.start]
            names = self._state_names(hyper, fmt)
            rule_state = self.state_names(hyper)
            master = "master" in names
            rule = self._rule_name(hyper, fmt)
            dtype = np.dtype(np.float32) if fmt is not None else None
            # a group's params got the same state names at construction (and load checks them)
            missing = [n for n in self._param_state_names(indices.start, hyper) if n not in self.state[indices.start]]
            if missing:
                raise ValueError(
                    f"param group {gi}: the hyperparameters now need state {missing} that was not "
                    "allocated at construction (e.g. amsgrad switched on mid-run)"
                )
            fused = self._flat_groups.get(gi)
            gbuf = flat.owner(grads[indices.start : indices.stop]) if fused else None
            if (fused and gbuf is not None and fused[0].same_layout(gbuf) and self._one_slot[gi]
                    and self._keeps_padding(hyper)):
                buf, whole = fused
                p = self._kernel_view(buf.data, fmt)
                # with master weights the kernel steps the float32 master and writes the half param
                arrays = (whole["master"] if master else p, self._kernel_view(gbuf.data, fmt),
                          *(whole[n] for n in rule_state))
                valid = self._valid_on_device.get(gi) if self._device is not None else buf.valid_counts()
                units.append(Launch(gi, arrays, rule, dtype or buf.dtype, indices, fmt, p,
                                    self._slot_of[indices.start], valid))
                grad_spans.append((span(gbuf.data), f"grad {indices.start}..{indices.stop - 1} (a FlatBuffer)"))
                continue
            for i in indices:
                check_like("grad", i, grads[i], self._infos[i], writeable=False)
            for i in indices:
                state = self.state[i]
                kind = self._lean[i]
                arrays = (state["master"] if master else self._flat[i], self._kernel_view(grads[i], fmt),
                          *(state[n] for n in (lean.NAMES[kind] if kind else rule_state)))
                units.append(Launch(gi, arrays, lean.kernel(self.rule(hyper), kind) if kind else rule,
                                    dtype or self._infos[i].dtype,
                                    range(i, i + 1), fmt, self._flat[i], self._slot_of[i], self._shard_valid))
                grad_spans.append((span(grads[i]), f"grad {i}"))
        self._check_grads_apart(grad_spans)
        return units

    def _check_grads_apart(self, grad_spans: list[tuple[tuple[int, int], str]]) -> None:
        """Refuse a gradient that shares memory with a param: the update would read its own writes."""
        for (start, stop), name in grad_spans:
            # params never overlap each other, so sorted by start they are sorted by end too: the
            # one param that can overlap a gradient is the last that starts before the gradient ends
            k = bisect.bisect_left(self._span_starts, stop) - 1
            if k >= 0 and start < stop and self._spans[self._span_order[k]][1] > start:
                raise ValueError(f"{name} shares memory with param {self._span_order[k]}: a gradient must not "
                                 "alias a param, or the update would read values it has already written")

    def _keeps_padding(self, hyper: Any) -> bool:
        """Whether one launch over a FlatBuffer keeps its padding at zero (``padding_stays_zero``)."""
        kept = self._keeps_padding_cache.get(hyper)
        if kept is None:
            kept = self._keeps_padding_cache[hyper] = padding_stays_zero(
                self.rule(hyper), self.state_init(hyper), self.state_names(hyper), hyper)
        return kept

    def _set_slots(self, steps: list[int]) -> None:
        """Group the params of each group by step count (a slot each); the device keeps a count and
        constants per slot. Steps move all params together, so the slots hold until the next load."""
        self._slot_of = [0] * len(self._params)
        self._slot_group: list[int] = []
        self._slot_first: list[int] = []
        slot_steps = []
        for gi, indices in enumerate(self._ranges):
            slots: dict[int, int] = {}
            for i in indices:
                if steps[i] not in slots:
                    slots[steps[i]] = len(self._slot_group)
                    self._slot_group.append(gi)
                    self._slot_first.append(i)
                    slot_steps.append(steps[i])
                self._slot_of[i] = slots[steps[i]]
        self._one_slot = [len({self._slot_of[i] for i in r}) == 1 for r in self._ranges]
        if self._device is not None:
            self._device.set_slots(slot_steps)

    def _step_on_device(self, units: list, hypers: list, inv_scale: float, max_norm: float, reduce: bool) -> None:
        """The GPU step when the constants come from the device: reduce, prepare, update; no sync."""
        dev = self._device
        be = self._backend
        self._calls += 1
        if reduce:
            for unit in units:
                dev.sumsq(unit.arrays[1], unit.fmt, inv_scale, unit.valid)
            if self._reduce_grad_stats is not None:
                self._reduce_grad_stats(dev.sums)  # in place, on the device, before prepare reads it
        if self.capturable:
            for gi, group in enumerate(self.param_groups):
                dev.sync_lr(gi, float(group["lr"]))
        last = len(self._slot_group) - 1
        for slot, (gi, first) in enumerate(zip(self._slot_group, self._slot_first)):
            host_step = 0 if self._device_counts else self._steps[first] + 1
            dev.prepare(slot, gi, hypers[gi], inv_scale, max_norm, self.skip_nonfinite, host_step, slot == last)
        for unit in units:
            be.launch(unit.rule, unit.arrays, dev.constants(unit.slot, unit.dtype), *self._rounding(unit))
        if not self._device_counts:
            self._steps = [s + 1 for s in self._steps]
        self._last_grad_norm = dev.norm if reduce else self._last_grad_norm
        self.last_step_launches = len(units)

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the state: ``{"optimizer", "state": {i: {...}}, "param_groups": [...],
        "rounding_counter", "steps_skipped"}``. Nothing in it is shared with the optimizer: editing it
        (a ``betas`` list included) changes nothing here."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        steps = self.steps
        state = {
            i: {"step": steps[i], **{n: self._host_state(i, a, n) for n, a in s.items()}}
            for i, s in enumerate(self.state)
        }
        groups = [{**{k: _copied(v) for k, v in group.items() if k != "params"}, "params": list(indices)}
                  for group, indices in zip(self.param_groups, self._ranges)]
        # the counter that seeds stochastic rounding: a resumed run draws the same random bits
        out = {"optimizer": type(self).__name__, "state": state, "param_groups": groups,
               "rounding_counter": self._calls, "steps_skipped": self.steps_skipped}
        if self._lean_format is not None:
            out["state_dtype"] = self._lean_format
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; a dict that does not fit the params is refused, changing nothing.

        The hyperparameters are copied in: editing ``state_dict`` afterwards changes nothing here. A
        dict without ``steps_skipped`` or ``rounding_counter`` (an older one) sets them to 0.
        """
        with self._lock:
            calls, skipped, new_groups, loaded = self._checked_state_dict(state_dict)
            self._load_checked(calls, skipped, new_groups, loaded)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError (or TypeError) naming the first way ``state_dict`` does not fit this
        optimizer; change nothing. ``load_state_dict`` and ``load`` check with this."""
        with self._lock:
            self._checked_state_dict(state_dict)

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> tuple:
        kind = state_dict.get("optimizer") if isinstance(state_dict, dict) else None
        if kind != type(self).__name__:
            raise ValueError(f"state_dict: saved by {kind}, this optimizer is {type(self).__name__}")
        saved_format = state_dict.get("state_dtype")
        if saved_format != self._lean_format:
            raise ValueError(f"state_dict: saved with state_dtype={saved_format!r}, this optimizer keeps "
                             f"state_dtype={self._lean_format!r} (it cannot change mid-run)")
        calls = _saved_count("rounding_counter", state_dict.get("rounding_counter", 0))
        skipped = _saved_count("steps_skipped", state_dict.get("steps_skipped", 0))
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            mine = [len(r) for r in self._ranges]
            if isinstance(groups, list):
                sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else "?"
                         for g in groups]
                got = f"it has {len(groups)} param groups of sizes {sizes}"
            else:
                got = f"its param_groups is a {type(groups).__name__}"
            raise ValueError(f"state_dict: {got}, this optimizer has {len(mine)} of sizes {mine}")
        new_groups = []
        for gi, (saved, group, indices) in enumerate(zip(groups, self.param_groups, self._ranges)):
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict: param group {gi}: expected a dict of hyperparameters and "
                                 f"'params', got {type(saved).__name__}")
            if not _is_index_list(saved.get("params", []), indices):
                raise ValueError(
                    f"state_dict: param group {gi} expected params {list(indices)}, got {saved.get('params')!r}"
                )
            new = {**{k: _copied(v) for k, v in saved.items() if k != "params"}, "params": group["params"]}
            new_groups.append((new, self._hyper(new, gi)))
        state = state_dict.get("state")
        if not isinstance(state, dict) or len(state) != len(self._params):
            got = len(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state_dict: expected state for {len(self._params)} params, got {got}")
        keys = sorted(state, key=repr)
        if not all(_is_int(k) for k in keys) or set(keys) != set(range(len(self._params))):
            raise ValueError(f"state_dict: expected state keyed by the param indices 0..{len(self._params) - 1} "
                             f"as integers, got keys {keys[:4]!r}{'...' if len(keys) > 4 else ''}")
        loaded = []
        for (_, hyper), indices in zip(new_groups, self._ranges):
            for index in indices:
                names = self._param_state_names(index, hyper)
                if set(names) != set(self.state[index]):
                    raise ValueError(
                        f"state_dict: param {index}: it holds state {sorted(names)} (its hyperparameters say), this "
                        f"optimizer allocated {sorted(self.state[index])} (construct it with the same flags, e.g. "
                        "amsgrad, as the saved one)"
                    )
                loaded.append(self._check_saved_state(index, state.get(index), names))
        return calls, skipped, new_groups, loaded

    def _load_checked(self, calls: int, skipped: int, new_groups: list, loaded: list) -> None:
        steps = [step for step, _ in loaded]
        be = self._backend
        for i, (_, arrays) in enumerate(loaded):
            for name, value in arrays.items():
                kind = self._lean[i]
                bits = value.dtype if kind and name in lean.NAMES[kind] else self._state_bits(i)
                be.copy_from_host(self.state[i][name], np.ascontiguousarray(value).view(bits))
        self._steps = steps
        self._calls = calls
        self._steps_skipped = skipped
        self._set_slots(steps)
        if self._device_counts:  # the device's count is the truth the next step reads
            self._device.skipped.copy_to_device(np.array([skipped], np.int64))
        for group, (new, _) in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new)

    def save(self, path: Any) -> None:
        """Write the optimizer's state to exactly ``path``, atomically (see ``gpuadam.checkpoint``)."""
        checkpoint.save(self, path)

    def load(self, path: Any) -> None:
        """Restore a ``save()``d state, or a sharded checkpoint directory of the same FlatBuffer's
        state (``gpuadam.distributed``); a bad or misfitting one is refused and nothing changes."""
        if os.path.isdir(path):
            sharded_checkpoint.load(self, os.fspath(path))
            return
        checkpoint.load(self, path)

    # --- machinery ---------------------------------------------------------------------------
    def _make_group(self, group: dict[str, Any]) -> dict[str, Any]:
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"param group: unknown hyperparameters {sorted(unknown)}")
        params = group["params"]
        if describe(params) is not None:
            params = [params]
        else:
            params = list(params)
        # Each group gets its own copy of every list/array value (the defaults' too): a betas list
        # edited in place in one group must not move another group, nor the caller's object.
        values = {k: _copied(v) for k, v in {**self.defaults, **group}.items() if k != "params"}
        return {**values, "params": params}

    def _hyper(self, group: dict[str, Any], index: int) -> Any:
        # Validation costs microseconds: redo it only when the group's values changed. The key is a
        # snapshot of the values, not the objects: a betas list edited in place must be seen (and
        # validated) by the next step, as torch.optim reads whatever the group holds.
        try:
            key = (tuple(group), tuple(_frozen(group.get(k)) for k in self.defaults))
        except _Unfrozen:  # a value of a kind we cannot snapshot: validate it every time
            key = None
        else:
            cached = self._hyper_cache.get(index)
            if cached is not None and cached[0] == key:
                return cached[1]
        hyper = self._validated_hyper(group, index)
        if key is not None:
            self._hyper_cache[index] = (key, hyper)
        return hyper

    def _validated_hyper(self, group: dict[str, Any], index: int) -> Any:
        missing = [k for k in self.defaults if k not in group]
        unknown = [k for k in group if k not in self.defaults and k != "params"]
        if missing or unknown:
            raise ValueError(f"param group {index}: missing hyperparameters {missing}, unknown {unknown}")
        kwargs = {k: group[k] for k in self.defaults}
        try:
            return self.hyper_class.from_kwargs(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None

    def _check_saved_state(self, i: int, saved: Any, names: tuple[str, ...]) -> tuple[int, dict]:
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict: param {i}: expected a dict of state arrays, got {type(saved).__name__}")
        step = saved.get("step")
        try:
            step = check_count("step", step)
        except (TypeError, ValueError):
            raise ValueError(f"state_dict: param {i}: expected an integer step in [0, 2**63 - 1] (the int64 "
                             f"the device and checkpoints count in), got {step!r}") from None
        got = set(saved) - {"step"}
        if got != set(names):
            raise ValueError(f"state_dict: param {i}: it holds state {sorted(got)}, this optimizer allocated "
                             f"{sorted(names)} (construct it with the same flags, e.g. amsgrad, as the saved one)")
        arrays = {}
        for name in names:
            value = saved[name]
            dtype, shape = self._state_spec(i, name)
            if not isinstance(value, np.ndarray):
                raise ValueError(f"state_dict: param {i}: state {name!r} is a {type(value).__name__}, expected an "
                                 f"array of shape {shape} and dtype {dtype}")
            if value.dtype != dtype:
                raise ValueError(f"state_dict: param {i}: state {name!r} has dtype {value.dtype}, this optimizer's "
                                 f"is {dtype}")
            if value.shape != shape:
                what = "the param's shape is" if shape == self._infos[i].shape else "expected (one per block)"
                raise ValueError(f"state_dict: param {i}: state {name!r} has shape {value.shape}, {what} {shape}")
            refusal = lean.absmax_refusal(name, int(np.count_nonzero(value < 0)))
            if refusal:
                raise ValueError(f"state_dict: param {i}: {refusal}")
            arrays[name] = value
        return step, arrays



def padding_stays_zero(rule: str, init: dict[str, float], names: Sequence[str], hyper: Any) -> bool:
    """Whether ``rule``, fed a zero param and gradient and the state's start values ``init``, returns a
    zero param and finite state at the first step and a late one (RAdam changes branch): then one
    launch over a flat buffer keeps its padding at zero. With eps=0 many rules would make 0/0 = NaN
    there; Adamax's ``exp_inf`` settles at eps."""
    element = RULES[rule].element
    state = [np.float64(init.get(name, 0.0)) for name in names]
    with np.errstate(all="ignore"):
        for step in (1, 1 << 20):
            try:
                after = np.atleast_1d(element(np.float64(0.0), np.float64(0.0), *state,
                                              hyper.constants(step, np.float64)))
            except (ArithmeticError, ValueError):
                return False
            if not (after[0] == 0.0 and bool(np.isfinite(after).all())):
                return False
    return True

def _shape_of(x: Any) -> tuple:
    return describe(x).shape


def _groups(params: Any) -> list[dict[str, Any]]:
    if describe(params) is not None:
        raise TypeError("params: expected an iterable of arrays or of dicts, got a single array")
    if not isinstance(params, Iterable):
        raise TypeError(f"params: expected an iterable of arrays or of dicts, got {type(params).__name__}")
    params = list(params)
    if params and all(isinstance(p, dict) for p in params):
        for gi, group in enumerate(params):
            if "params" not in group:
                raise ValueError(f"param group {gi}: expected a 'params' key")
        return params
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params: expected all arrays or all dicts, got a mix")
    return [{"params": params}]


class _Unfrozen(Exception):
    """Internal: a hyperparameter value ``_frozen`` cannot snapshot."""


def _frozen(value: Any) -> tuple:
    """A snapshot of a hyperparameter's value that compares equal only to an equal value of the same
    type (so ``True`` is not ``1``), and that no later edit of ``value`` can change."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic)):
        return (type(value), value)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_frozen(v) for v in value))
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return (np.ndarray, value.dtype.str, value.shape, value.tobytes())
    raise _Unfrozen


def _copied(value: Any) -> Any:
    """``value`` with its lists, tuples, dicts and arrays copied, all the way down (scalars are immutable)."""
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_index_list(saved: Any, indices: range) -> bool:
    """Whether a saved group's ``params`` are exactly ``indices`` (compared without NumPy's elementwise ==)."""
    return (isinstance(saved, (list, tuple)) and len(saved) == len(indices)
            and all(_is_int(p) and p == i for p, i in zip(saved, indices)))


def _saved_count(name: str, value: Any) -> int:
    try:
        return check_count(name, value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state_dict: {exc}") from None


# The optimizer that stepped a param last owns it: one that had stepped the same memory before (one
# FlatBuffer's views in two optimizers) is refused from then on, while the new owner lives: stepping
# both would update each param twice a step. Taken over at a step, not at construction, so that a
# new optimizer may replace a live one over the same params (``opt = Adam(...)`` run again, or a
# state loaded into a fresh optimizer) as long as the old one steps no more.
_claims: dict[int, tuple[weakref.ref, list[tuple[int, int]]]] = {}
_claims_lock = threading.Lock()


def _claim(opt: Optimizer) -> None:
    """Make ``opt`` the owner of its params' memory: every other live optimizer that stepped memory
    one of them overlaps is displaced (its next ``step()`` is refused while ``opt`` lives)."""
    with _claims_lock:
        for key, (ref, spans) in list(_claims.items()):
            other = ref()
            if other is None or other is opt:
                continue
            # the params of one optimizer never overlap (refused at construction): a pair is one of
            # each, ours first
            pair = first_overlap(opt._spans + spans)
            if pair is not None:
                other._displaced = (weakref.ref(opt), pair[1] - len(opt._spans), pair[0])
                del _claims[key]
        _claims[id(opt)] = (weakref.ref(opt), opt._spans)
        weakref.finalize(opt, _claims.pop, id(opt), None)
        opt._claimed = True
        opt._displaced = None


def _check_owner(opt: Optimizer) -> None:
    """Refuse a step of ``opt`` when a live optimizer has stepped its params since."""
    newer, mine, theirs = opt._displaced
    owner = newer()
    if owner is None:  # the newer owner is gone: this one may claim its params again
        opt._claimed = False
        opt._displaced = None
        return
    raise ValueError(f"param {mine} shares memory with param {theirs} of a {type(owner).__name__} that has stepped it "
                     "since: each step of both would update it twice; step one optimizer per param (drop the other)")
