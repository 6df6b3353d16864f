"""``gpuadam demo``: the Adam family side by side on a two-headed classifier.

In the spirit of multi-dimensional classification on office31 (each photo is labelled with the
office item it shows AND the domain it was taken in), scikit-learn's bundled 8x8 digits are
rendered in three synthetic domains -- clean, inverted, and noisy + shifted -- so every sample
carries two labels: its digit (10 items) and its domain (3). One shared hidden layer (ReLU) feeds
two softmax heads, and the loss is ``L = L_item + L_domain`` (two mean cross-entropies).

Forward and backward are written by hand in NumPy (CuPy when the optimizer runs on a GPU). All
parameters live in ONE ``gpuadam.FlatBuffer`` whose views are the weight matrices and biases; the
gradients are written into the views of ``params.zeros_like()``, and ``opt.step(grads.views)``
updates the whole model with one fused kernel launch.

Every optimizer starts from the same initialisation and sees the same mini-batches. The held-out
split is made on the digit images BEFORE they are rendered, so no test image appears in training
in another domain. Needs the ``demo`` extra: ``pip install 'gpuadam[demo]'``.

``--framework torch`` trains the same network as a torch ``nn.Module`` (autograd's forward and
backward) with the ``gpuadam.torch`` drop-in optimizers instead (``gpuadam.demo_torch``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import gpuadam
from gpuadam.outputs import check_output_dir

PNG_NAME = "demo_losses.png"
JSON_NAME = "demo_table.json"
DEFAULT_STEPS = 2000
QUICK_STEPS = 150
BACKENDS = ("auto", "numba-cpu", "numba-cuda", "cupy")
FRAMEWORKS = ("numpy", "torch")


@dataclass(frozen=True)
class Contender:
    """One line of the comparison: a label, the gpuadam class it needs, and its arguments."""

    label: str
    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    linestyle: str = "-"  # of its loss curve


# Learning rates tuned for this problem (mean cross-entropies, batch 64); torch.optim's meanings.
CONTENDERS = (
    Contender("SGD", "SGD", {"lr": 0.2}),
    Contender("Momentum", "SGD", {"lr": 0.05, "momentum": 0.9}),
    Contender("RMSprop", "RMSprop", {"lr": 1e-3}),
    Contender("AdaGrad", "Adagrad", {"lr": 0.05}),
    Contender("Adam", "Adam", {"lr": 2e-3}),
    Contender("AdamW", "AdamW", {"lr": 2e-3, "weight_decay": 1e-2}, linestyle="--"),  # it runs on top of Adam
)
STATE_DTYPES = ("bfloat16", "int8")


def lean_contenders(state_dtype: str) -> tuple[Contender, ...]:
    """Adam and AdamW again with their moments kept as ``state_dtype`` (``--state-dtype``)."""
    return tuple(Contender(f"{c.label}/{state_dtype}", c.class_name, {**c.kwargs, "state_dtype": state_dtype}, ":")
                 for c in CONTENDERS if c.class_name in ("Adam", "AdamW"))


@dataclass(frozen=True)
class Config:
    steps: int = DEFAULT_STEPS
    batch_size: int = 64
    hidden: int = 128
    seed: int = 0
    noise: float = 0.2


# --- data ------------------------------------------------------------------------------------
DOMAINS = ("clean", "inverted", "noisy+shifted")


@dataclass
class Split:
    x: np.ndarray  # (n, 64) float32
    item: np.ndarray  # (n,) int64, the digit
    domain: np.ndarray  # (n,) int64, index into DOMAINS


def render_domains(images: np.ndarray, digits: np.ndarray, rng: np.random.Generator, noise: float) -> Split:
    """Every image (n, 8, 8), values in [0, 1], in each of the three domains."""
    n = len(images)
    clean = images
    inverted = 1.0 - images
    # The third "camera" sits one pixel off (up and left: the digit moves down and right) and is noisy.
    shifted = np.pad(images, ((0, 0), (1, 0), (1, 0)))[:, :8, :8]
    noisy = shifted + rng.normal(0.0, noise, size=shifted.shape)
    x = np.concatenate([clean, inverted, noisy]).reshape(3 * n, 64).astype(np.float32)
    item = np.tile(digits, 3).astype(np.int64)
    domain = np.repeat(np.arange(3), n).astype(np.int64)
    return Split(x, item, domain)


def load_data(config: Config) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    index = np.arange(len(images))
    train, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=config.seed)
    rng = np.random.default_rng(config.seed)
    return (
        render_domains(images[train], digits.target[train], rng, config.noise),
        render_domains(images[test], digits.target[test], rng, config.noise),
    )


# --- the network -----------------------------------------------------------------------------
def shapes(hidden: int) -> list[tuple[int, ...]]:
    """W1, b1, W_item, b_item, W_domain, b_domain."""
    return [(64, hidden), (hidden,), (hidden, 10), (10,), (hidden, 3), (3,)]


def init_params(config: Config) -> list[np.ndarray]:
    """He-initialised weights, zero biases, float32: the one starting point of every optimizer."""
    rng = np.random.default_rng(config.seed + 1)
    out = []
    for s in shapes(config.hidden):
        if len(s) == 2:
            out.append((rng.standard_normal(s) * math.sqrt(2.0 / s[0])).astype(np.float32))
        else:
            out.append(np.zeros(s, np.float32))
    return out


def _log_softmax(xp: Any, z: Any) -> Any:
    z = z - z.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


class TwoHeadedNet:
    """``h = relu(x W1 + b1)``; ``item = h W_item + b_item``; ``domain = h W_domain + b_domain``.

    ``params`` and ``grads`` are lists of arrays in the order of ``shapes()``: NumPy views of the
    flat buffers, or CuPy arrays over the same device memory. Gradients are written in place.
    """

    def __init__(self, xp: Any, params: list[Any], grads: list[Any]) -> None:
        self.xp = xp
        self.params = params
        self.grads = grads

    def _forward(self, x: Any) -> tuple[Any, Any, Any, Any]:
        w1, b1, wi, bi, wd, bd = self.params
        pre = x @ w1 + b1
        h = self.xp.maximum(pre, 0)
        return pre, h, h @ wi + bi, h @ wd + bd

    def loss(self, x: Any, item: Any, domain: Any) -> float:
        xp = self.xp
        _, _, zi, zd = self._forward(x)
        rows = xp.arange(len(x))
        return float(-(_log_softmax(xp, zi)[rows, item].mean() + _log_softmax(xp, zd)[rows, domain].mean()))

    def predict(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        _, _, zi, zd = self._forward(x)
        return _host(zi.argmax(axis=1)), _host(zd.argmax(axis=1))

    def loss_and_grad(self, x: Any, item: Any, domain: Any) -> Any:
        """``L = L_item + L_domain`` on the batch (a 0-d array); its gradients into ``self.grads``."""
        xp = self.xp
        _, wi, _, wd, _ = self.params[1:]
        gw1, gb1, gwi, gbi, gwd, gbd = self.grads
        pre, h, zi, zd = self._forward(x)
        n = len(x)
        rows = xp.arange(n)
        log_pi = _log_softmax(xp, zi)
        log_pd = _log_softmax(xp, zd)
        loss = -(log_pi[rows, item].mean() + log_pd[rows, domain].mean())
        # d(mean cross-entropy)/d(logits) = (softmax - onehot) / n, for each head
        di = xp.exp(log_pi)
        di[rows, item] -= 1
        di /= n
        dd = xp.exp(log_pd)
        dd[rows, domain] -= 1
        dd /= n
        gwi[...] = h.T @ di
        gbi[...] = di.sum(axis=0)
        gwd[...] = h.T @ dd
        gbd[...] = dd.sum(axis=0)
        dh = di @ wi.T + dd @ wd.T  # both heads pull on the shared layer: L = L1 + L2
        dh *= pre > 0
        gw1[...] = x.T @ dh
        gb1[...] = dh.sum(axis=0)
        return loss


def _host(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


# --- backend ---------------------------------------------------------------------------------
class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says why."""


def resolve_backend(requested: str) -> tuple[str, Any]:
    """``(backend name, array module)``: GPU backends compute forward/backward with CuPy."""
    status = gpuadam.available_backends()
    cupy_ok = status["cupy"].available
    if requested == "auto":
        if cupy_ok:
            requested = "numba-cuda" if status["numba-cuda"].available else "cupy"
        else:
            requested = "numba-cpu"
    usable = ", ".join(["auto", *(n for n in BACKENDS[1:] if status[n].available)])
    if requested not in status:
        raise DemoError(f"got {requested!r}; expected one of {', '.join(BACKENDS)}")
    if not status[requested].available:
        raise DemoError(f"got {requested!r}, which cannot run here ({status[requested].reason}); "
                        f"expected one of {usable}")
    if requested == "numba-cpu":
        return requested, np
    if not cupy_ok:
        raise DemoError(
            f"got {requested!r}, but the demo's forward and backward pass on the GPU use CuPy, which cannot "
            f"run here ({status['cupy'].reason}); expected numba-cpu or auto"
        )
    import cupy

    return requested, cupy


def resolve_torch_backend(requested: str) -> tuple[str, str]:
    """``(backend, torch device)`` of ``--framework torch``; DemoError saying why it cannot run."""
    try:
        from gpuadam import demo_torch
    except ImportError as exc:
        raise DemoError(f"--framework torch needs torch, not installed ({exc})") from None
    try:
        return demo_torch.resolve_backend(requested)
    except ValueError as exc:
        raise DemoError(str(exc)) from None


def _synchronize(xp: Any) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


# --- training --------------------------------------------------------------------------------
def batch_schedule(n: int, config: Config) -> np.ndarray:
    """(steps, batch_size) sample indices: shuffled epochs, the same for every optimizer."""
    rng = np.random.default_rng(config.seed + 2)
    need = config.steps * config.batch_size
    epochs = [rng.permutation(n) for _ in range(-(-need // n))]
    return np.concatenate(epochs)[:need].reshape(config.steps, config.batch_size)


def train_one(
    contender: Contender, config: Config, backend: str, xp: Any, data: dict[str, Any],
    init: list[np.ndarray], schedule: Any, progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    cls = getattr(gpuadam, contender.class_name)
    params = gpuadam.FlatBuffer.from_arrays([xp.asarray(a) for a in init])
    grads = params.zeros_like()
    net = TwoHeadedNet(xp, [xp.asarray(v) for v in params.views], [xp.asarray(v) for v in grads.views])
    opt = cls(params.views, backend=backend, **contender.kwargs)
    losses: list[float] = []
    step_ns: list[int] = []
    diverged = False
    x, item, domain = data["train"]
    bar = tqdm(schedule, desc=f"{contender.label:8s}", unit="step", disable=not progress, leave=True)
    for t, idx in enumerate(bar):
        loss = net.loss_and_grad(x[idx], item[idx], domain[idx])
        _synchronize(xp)
        start = time.perf_counter_ns()
        opt.step(grads.views)
        _synchronize(xp)  # on a GPU, the kernel's run time too, not only its launch
        step_ns.append(time.perf_counter_ns() - start)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        if t % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    final = net.loss(x, item, domain)
    xt, it, dt = data["test"]
    pred_item, pred_domain = net.predict(xt)
    return result_row(contender, diverged, final, float(np.mean(pred_item == _host(it))),
                      float(np.mean(pred_domain == _host(dt))), losses,
                      step_us_median=float(np.median(step_ns)) / 1e3,
                      launches_per_step=getattr(opt, "last_step_launches", None), state_bytes=opt.state_nbytes)


def result_row(contender: Contender, diverged: bool, final: float, item_accuracy: float, domain_accuracy: float,
               curve: list[float], **measured: Any) -> dict[str, Any]:
    """One contender's row of the table (and its loss curve), from either framework's training."""
    return {
        "optimizer": contender.label,
        "class": contender.class_name,
        "kwargs": dict(contender.kwargs),
        "linestyle": contender.linestyle,
        "diverged": diverged,
        "final_train_loss": final if math.isfinite(final) else None,
        "item_accuracy": item_accuracy,
        "domain_accuracy": domain_accuracy,
        **measured,
        "curve": curve,
    }


def run(config: Config, backend: str = "auto", out: Path | str = ".", progress: bool = True,
        framework: str = "numpy", state_dtype: str | None = None) -> dict[str, Any]:
    """Train every contender (and, with ``state_dtype``, Adam and AdamW again with lean state), write
    ``demo_losses.png`` and ``demo_table.json`` into ``out``; with ``framework="torch"``, as a torch
    module stepped by ``gpuadam.torch``."""
    if framework == "torch":
        from gpuadam import demo_torch

        backend, xp, train_one_with = resolve_torch_backend(backend)[0], np, demo_torch.train_one
    else:
        (backend, xp), train_one_with = resolve_backend(backend), train_one
    train, test = load_data(config)
    data = {
        "train": (xp.asarray(train.x), xp.asarray(train.item), xp.asarray(train.domain)),
        "test": (xp.asarray(test.x), xp.asarray(test.item), xp.asarray(test.domain)),
    }
    init = init_params(config)
    schedule = xp.asarray(batch_schedule(len(train.x), config))
    initial_loss = TwoHeadedNet(xp, [xp.asarray(a) for a in init], []).loss(*data["train"])
    start = time.perf_counter()
    results = []
    for contender in CONTENDERS + (lean_contenders(state_dtype) if state_dtype else ()):
        if framework == "torch":
            results.append(result_row(contender, **train_one_with(contender, config, backend, data, init,
                                                                  schedule, progress)))
        else:
            results.append(train_one(contender, config, backend, xp, data, init, schedule, progress))
    seconds = time.perf_counter() - start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = {
        "gpuadam_version": gpuadam.__version__,
        "backend": backend,
        "framework": framework,
        "config": {**config.__dict__, "n_train": len(train.x), "n_test": len(test.x), "domains": list(DOMAINS)},
        "initial_train_loss": initial_loss,
        "train_seconds": seconds,
        "results": [{k: v for k, v in r.items() if k not in ("curve", "linestyle")} for r in results],
    }
    plot_curves(results, config, backend if framework == "numpy" else f"{backend}, torch", initial_loss,
                out / PNG_NAME)
    (out / JSON_NAME).write_text(json.dumps(table, indent=2) + "\n")
    return table


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve starts at the first loss."""
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_curves(results: list[dict], config: Config, backend: str, initial: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    window = max(1, config.steps // 40)
    for i, r in enumerate(results):
        args = ", ".join(f"{k}={v:g}" for k, v in r["kwargs"].items() if k != "state_dtype")
        ax.plot(np.arange(1, len(r["curve"]) + 1), smooth(r["curve"], window), lw=1.8, color=f"C{i}", ls=r["linestyle"],
                label=f"{r['optimizer']} ({args})")
    ax.axhline(initial, color="0.6", ls=":", lw=1, label=f"at initialisation ({initial:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel(f"optimizer step (mini-batch of {config.batch_size})")
    ax.set_ylabel(f"training loss  L = L_item + L_domain\n(mini-batch, moving average of {window})")
    ax.set_title(f"Two-headed digits classifier (10 items x 3 domains), gpuadam on {backend}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.savefig(path, dpi=120)


def format_table(table: dict[str, Any]) -> str:
    head = (f"{'optimizer':14s} {'final loss':>10s} {'item acc':>9s} {'domain acc':>10s} {'step (us)':>10s} "
            f"{'state (B)':>10s}")
    lines = [head, "-" * len(head)]
    for r in table["results"]:
        loss = "diverged" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
        lines.append(
            f"{r['optimizer']:14s} {loss:>10s} {r['item_accuracy']:>9.1%} {r['domain_accuracy']:>10.1%} "
            f"{r['step_us_median']:>10.1f} {r.get('state_bytes', 0):>10d}"
        )
    c = table["config"]
    torch_run = table.get("framework") == "torch"
    if torch_run:
        lines.append("torch nn.Module (autograd) stepped by gpuadam.torch; a training iteration (forward, "
                     "backward, step), median us: " + ", ".join(f"{r['optimizer']} {r['iteration_us_median']:.0f}"
                                                               for r in table["results"]))
    lines.append(
        f"backend {table['backend']}; {c['steps']} steps of batch {c['batch_size']}; train {c['n_train']}, "
        f"held-out {c['n_test']} samples; accuracies on the held-out split; step = median time of opt.step()"
    )
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".", help=f"folder for {PNG_NAME} and {JSON_NAME} (default: .)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="where the optimizer runs (default auto: on a GPU when CuPy runs there, which "
                             "computes the forward and backward pass, with numba-cuda, else cupy; otherwise "
                             "numba-cpu)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per optimizer (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: a smoke test, not a comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, initialisation and batches")
    parser.add_argument("--framework", default="numpy", choices=FRAMEWORKS,
                        help="numpy (default): forward/backward by hand, gpuadam's own optimizers on a FlatBuffer; "
                             "torch: a torch nn.Module (autograd) stepped by the gpuadam.torch drop-ins")
    parser.add_argument("--state-dtype", default=None, choices=STATE_DTYPES,
                        help="also train Adam and AdamW with their moments kept in this format (numba-cpu or "
                             "numba-cuda, --framework numpy)")


def _fail(message: str) -> int:
    print(f"gpuadam demo: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    """``gpuadam demo``: every check (extras, --steps, --out, --backend) before the training starts."""
    missing = []
    for module in ("sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return _fail(f"needs {', '.join(missing)}, not installed: pip install 'gpuadam[demo]'")
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 1:
        return _fail(f"--steps: got {steps}; expected an integer >= 1")
    state_dtype = getattr(args, "state_dtype", None)
    try:
        check_output_dir("--out", args.out)
        if args.framework == "torch":
            name = resolve_torch_backend(args.backend)[0]
        else:
            name, _ = resolve_backend(args.backend)
    except ValueError as exc:
        return _fail(str(exc))
    except DemoError as exc:
        return _fail(f"--backend: {exc}")
    config = Config(steps=steps, seed=args.seed)
    table = run(config, args.backend, args.out, framework=args.framework, state_dtype=state_dtype)
    print(format_table(table))
    out = Path(args.out)
    print(f"wrote {out / PNG_NAME} and {out / JSON_NAME} ({table['train_seconds']:.1f} s of training)")
    return 0
