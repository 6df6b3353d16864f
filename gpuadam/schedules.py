"""Learning-rate schedules: plain callables ``step -> lr``, and a scheduler that applies them.

A schedule returns the learning rate itself (not a factor) for optimizer step ``step``, counted from 1
like the optimizer's own step count: ``schedule(1)`` is the lr of the first ``opt.step()``.

``LRScheduler`` follows ``torch.optim.lr_scheduler``'s calling convention, shifted to that count::

    sched = LRScheduler(opt, cosine_decay(1e-3, total_steps=10_000, warmup_steps=500))
    for grads in batches:          # construction already set every group's lr to schedule(1)
        opt.step(grads)            # step t runs with schedule(t)
        sched.step()               # then sets schedule(t + 1) for the next step

The same schedule reproduces ``torch.optim.lr_scheduler.LambdaLR(topt, lambda e: schedule(e + 1) / lr0)``
with base lr ``lr0``: torch counts its epochs from 0. Any hyperparameter of ``opt.param_groups`` may
also be set by hand between steps; the next ``opt.step()`` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpuadam.hyper import check_nonnegative

Schedule = Callable[[int], float]


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _step(step: Any) -> int:
    return _count("step", step, 1)  # 0 would be an off-by-one: the first optimizer step is 1


def constant(lr: float) -> Schedule:
    """``lr`` at every step."""
    lr = check_nonnegative("lr", lr)

    def schedule(step: int) -> float:
        _step(step)
        return lr

    return schedule


def linear_warmup(peak_lr: float, warmup_steps: int) -> Schedule:
    """``peak_lr * step / warmup_steps`` up to step ``warmup_steps``, then ``peak_lr``.

    The first step already moves (``peak_lr / warmup_steps``), unlike 0-based warm-ups whose first
    step has lr 0; ``warmup_steps=0`` is ``constant(peak_lr)``.
    """
    peak_lr = check_nonnegative("peak_lr", peak_lr)
    warmup_steps = _count("warmup_steps", warmup_steps, 0)

    def schedule(step: int) -> float:
        step = _step(step)
        if step >= warmup_steps:
            return peak_lr
        return peak_lr * step / warmup_steps

    return schedule


def cosine_decay(peak_lr: float, total_steps: int, final_lr: float = 0.0, warmup_steps: int = 0) -> Schedule:
    """Linear warm-up to ``peak_lr`` at step ``warmup_steps``, half a cosine down to ``final_lr`` at
    step ``total_steps``, then ``final_lr``.

    Step ``t`` in the decay uses ``final + (peak - final) * (1 + cos(pi * (t - w) / (total - w))) / 2``
    with ``w = warmup_steps``: the curve starts at ``peak_lr`` at step ``w`` (step 0 when there is no
    warm-up, so the first step is already a little below the peak) and reaches ``final_lr`` exactly.
    """
    peak_lr = check_nonnegative("peak_lr", peak_lr)
    final_lr = check_nonnegative("final_lr", final_lr)
    total_steps = _count("total_steps", total_steps, 1)
    warmup_steps = _count("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if final_lr > peak_lr:
        raise ValueError(f"final_lr ({final_lr}) must be <= peak_lr ({peak_lr}): this is a decay")
    decay_steps = total_steps - warmup_steps

    def schedule(step: int) -> float:
        step = _step(step)
        if step <= warmup_steps:
            return peak_lr * step / warmup_steps
        if step >= total_steps:
            return final_lr
        progress = (step - warmup_steps) / decay_steps
        return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


class LRScheduler:
    """Sets ``lr`` in every param group of ``optimizer`` from ``schedule``, one optimizer step at a time.

    ``schedule`` is one callable for all groups, or a sequence with one per group (for groups whose
    lrs differ). Construction sets the lrs for step ``current_step`` (1, or ``n + 1`` to resume after
    ``n`` steps); each ``step()`` advances to the next. Only ``lr`` is touched.
    """

    def __init__(
        self, optimizer: Any, schedule: Schedule | Sequence[Schedule], *, current_step: int = 1
    ) -> None:
        groups = optimizer.param_groups
        schedules = list(schedule) if isinstance(schedule, Sequence) else [schedule] * len(groups)
        if len(schedules) != len(groups):
            raise ValueError(f"schedule: expected one per param group ({len(groups)}), got {len(schedules)}")
        for i, s in enumerate(schedules):
            if not callable(s):
                raise TypeError(f"schedule {i}: expected a callable step -> lr, got {type(s).__name__}")
        self.optimizer = optimizer
        self.schedules = schedules
        self.current_step = _count("current_step", current_step, 1)
        self._apply(self.current_step)

    def step(self) -> None:
        """Call after ``opt.step()``: set the lrs of the next optimizer step."""
        self._apply(self.current_step + 1)

    def get_last_lr(self) -> list[float]:
        """The lr of every group for step ``current_step`` (what the next ``opt.step()`` uses)."""
        return list(self._last_lr)

    def _apply(self, step: int) -> None:
        # every value first, then every group: a schedule that raises or returns a bad lr changes nothing
        values = [check_nonnegative(f"schedule {i}: lr at step {step}", s(step)) for i, s in enumerate(self.schedules)]
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values
        self.current_step = step
