"""The optimizers: Adam, AdamW, SGD (with momentum), RMSprop, Adagrad, Adamax, NAdam and RAdam with
the names, defaults, argument checks and algorithms of ``torch.optim``, and Lion.

Each class names its hyperparameter record (``gpuadam.hyper``) and the rule that updates its params
(``kernels.rules``, which also names the state arrays); ``Optimizer`` does everything else: groups,
validation, flat buffers, step counts, clipping and skipping, ``state_dict`` and checkpoints.
``maximize`` is keyword-only where PyTorch has a positional argument in its place. The options every
optimizer shares (``skip_nonfinite``, ``capturable``, ``master_weights``, ``stochastic_rounding``,
``seed``, ``half_format``) are keyword-only parameters of each class, so ``help()`` and editors
show them.
"""

from __future__ import annotations

from typing import Any

from gpuadam.hyper import (
    AdagradHyper,
    AdamaxHyper,
    AdamHyper,
    LionHyper,
    NAdamHyper,
    RAdamHyper,
    RMSpropHyper,
    SGDHyper,
)
from gpuadam.optim import Optimizer


class Adam(Optimizer):
    """Fused Adam (and AdamW with ``decoupled_weight_decay=True``), PyTorch's algorithm and names.

    ``eps_root`` adds a term inside the square root (``sqrt(v_hat + eps_root) + eps``, as optax);
    ``bias_correction=False`` drops both bias corrections.

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.

    ``state_dtype`` (float32 params, or half params with ``master_weights``; no amsgrad): ``"int8"``
    keeps both moments as bitsandbytes-compatible blockwise 8-bit codes (params under 4096 elements
    keep float32 state), ``"bfloat16"`` as bfloat16 rounded stochastically; the math stays float32
    (``gpuadam.lean``). NAdam and RAdam take it too.
    """

    hyper_class = AdamHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_root: float = 0.0,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, eps_root=eps_root, bias_correction=bias_correction,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        AdamHyper.from_kwargs(**defaults)  # refuse bad defaults even when every group overrides them
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
            state_dtype=state_dtype,
        )

    def rule(self, hyper: AdamHyper) -> str:
        return "amsgrad" if hyper.amsgrad else "adam"


class AdamW(Adam):
    """Adam with decoupled weight decay (``p *= 1 - lr * weight_decay``), default decay 1e-2.

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_root: float = 0.0,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = True,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
        state_dtype: str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, eps_root=eps_root,
            bias_correction=bias_correction, decoupled_weight_decay=decoupled_weight_decay,
            backend=backend, skip_nonfinite=skip_nonfinite, capturable=capturable, master_weights=master_weights,
            stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format, state_dtype=state_dtype,
        )


class SGD(Optimizer):
    """Fused ``torch.optim.SGD``: plain, with momentum, or with Nesterov momentum.

    PyTorch's momentum copies the first gradient into the buffer, then ``b = momentum b + (1 -
    dampening) g``, and steps ``p -= lr b`` (Nesterov: ``p -= lr (g + momentum b)``).

    ``ema_momentum=True`` (not in PyTorch) takes the textbook's exponential average instead:
    ``v = momentum v + (1 - momentum) g`` from ``v = 0``, and ``p -= lr v``. It differs from
    PyTorch's from the first step on: ``v_1 = (1 - momentum) g`` where PyTorch's buffer is ``g``
    (with ``dampening=momentum`` PyTorch's later steps are the same recurrence, but from ``g``), and
    without dampening PyTorch's buffer settles ``1 / (1 - momentum)`` times larger: the same
    training needs an ``lr`` that much larger. It takes no dampening and no Nesterov.

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.
    """

    hyper_class = SGDHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        ema_momentum: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, ema_momentum=ema_momentum)
        SGDHyper.from_kwargs(**defaults)  # refuse bad defaults even when every group overrides them
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
        )


    def rule(self, hyper: SGDHyper) -> str:
        return "sgd_momentum" if hyper.momentum != 0.0 else "sgd"


class RMSprop(Optimizer):
    """Fused ``torch.optim.RMSprop``: ``v = alpha v + (1 - alpha) g^2``, ``p -= lr g / (sqrt(v) +
    eps)``; ``centered`` subtracts the squared running mean of g from v, ``momentum > 0`` keeps a
    buffer of the scaled steps. Each of the four variants is its own kernel (their arrays differ).

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.
    """

    hyper_class = RMSpropHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        RMSpropHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
        )


    def rule(self, hyper: RMSpropHyper) -> str:
        return "rmsprop" + ("_centered" if hyper.centered else "") + ("_momentum" if hyper.momentum > 0.0 else "")


class Adagrad(Optimizer):
    """Fused ``torch.optim.Adagrad`` (dense gradients): ``sum += g^2``, ``p -= clr g / (sqrt(sum) +
    eps)`` with ``clr = lr / (1 + (t - 1) lr_decay)``; ``sum`` starts at ``initial_accumulator_value``.

    Each param group's own ``initial_accumulator_value`` sets its state (PyTorch uses the
    constructor's value for every group; the two agree unless a group overrides it).

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.
    """

    hyper_class = AdagradHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
        AdagradHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
        )


    def state_init(self, hyper: AdagradHyper) -> dict[str, float]:
        return {"sum": hyper.initial_accumulator_value}

    def rule(self, hyper: AdagradHyper) -> str:
        return "adagrad"


class Adamax(Optimizer):
    """Fused ``torch.optim.Adamax``: Adam with the infinity norm ``u = max(beta2 u, |g| + eps)`` in
    place of the second moment, ``p -= lr / (1 - beta1^t) * m / u``.

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``.
    """

    hyper_class = AdamaxHyper

    def __init__(
        self,
        params: Any,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        AdamaxHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
        )


    def rule(self, hyper: AdamaxHyper) -> str:
        return "adamax"


class NAdam(Optimizer):
    """Fused ``torch.optim.NAdam``: Adam with Nesterov momentum and PyTorch's momentum schedule
    ``mu_t = beta1 (1 - 0.5 * 0.96**(t momentum_decay))``. The product of the ``mu`` that PyTorch
    keeps as state is a function of the step count, computed with the step's constants (so the
    state is ``exp_avg`` and ``exp_avg_sq`` only).

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``;
    ``state_dtype`` keeps the moments lean, as ``Adam``'s does.
    """

    hyper_class = NAdamHyper

    def __init__(
        self,
        params: Any,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        NAdamHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
            state_dtype=state_dtype,
        )


    def rule(self, hyper: NAdamHyper) -> str:
        return "nadam"


class RAdam(Optimizer):
    """Fused ``torch.optim.RAdam``: Adam's moments, the variance-rectified adaptive step once the
    SMA length ``rho_t`` exceeds 5, the bias-corrected momentum step (no division by v) before.

    Shared options, keyword-only as in every optimizer here: ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN changes nothing, not even the step count), ``capturable`` (GPU: step
    counts and lr on the device, no host synchronisation, for CUDA graphs), ``master_weights``
    (float16/bfloat16 params keep float32 master weights and float32 state), ``stochastic_rounding``
    with ``seed`` (bfloat16 params without master weights round stochastically, from a hash of seed,
    step and element), ``half_format`` (``"bfloat16"`` declares uint16/int16 device storage as
    bfloat16); ``backend`` is ``"auto"``, ``"numba-cpu"``, ``"numba-cuda"`` or ``"cupy"``;
    ``state_dtype`` keeps the moments lean, as ``Adam``'s does.
    """

    hyper_class = RAdamHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        RAdamHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
            state_dtype=state_dtype,
        )


    def rule(self, hyper: RAdamHyper) -> str:
        return "radam"


class Lion(Optimizer):
    """Fused Lion (Chen et al., 2023): ``u = beta1 m + (1 - beta1) g``, ``p = p (1 - lr wd) - lr
    sign(u)``, ``m = beta2 m + (1 - beta2) g``. One state array (``exp_avg``), no bias correction;
    its steps are all of size lr, so it wants an lr 3-10x below AdamW's and a larger weight decay.
    The shared options are Adam's."""

    hyper_class = LionHyper

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        half_format: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        LionHyper.from_kwargs(**defaults)
        super().__init__(
            params, defaults, backend, skip_nonfinite=skip_nonfinite, capturable=capturable,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed, half_format=half_format,
        )

    def rule(self, hyper: LionHyper) -> str:
        return "lion"
