"""Paths of gradient descent, Momentum, RMSprop and Adam over contour plots (``docs/paths.png``).

Two surfaces: an elongated quadratic bowl, where plain gradient descent zig-zags across the narrow
axis while crawling along the long one, and the Rosenbrock function's curved valley. Each optimizer
is gpuadam's own, stepping a 2-element float64 parameter array in place with ``opt.step([grad])``.

FALLBACK: while this gpuadam has no ``SGD`` or ``RMSprop`` (``hasattr(gpuadam, ...)`` is false),
those paths come from a tiny NumPy loop in THIS SCRIPT with torch.optim's update rules, and the
legend says so ("NumPy fallback"). Run the script again once gpuadam has them.

    python scripts/plot_paths.py [--out docs/paths.png] [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gpuadam

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "paths.png"


@dataclass(frozen=True)
class Surface:
    title: str
    f: Callable[[np.ndarray, np.ndarray], np.ndarray]  # vectorised over grids
    grad: Callable[[np.ndarray], np.ndarray]
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    levels: np.ndarray
    steps: int
    # label -> (gpuadam class name, keyword arguments, torch.optim-style)
    optimizers: dict[str, tuple[str, dict]]


# f = x^2 / 40 + y^2: curvature 0.05 along x, 2 along y (a condition number of 40). Descent's step
# size is capped by the steep y axis (lr < 1), so it bounces across y and crawls along x.
BOWL = Surface(
    title="Elongated quadratic bowl  f = x²/40 + y²",
    f=lambda x, y: x**2 / 40 + y**2,
    grad=lambda p: np.array([p[0] / 20, 2 * p[1]]),
    start=(-9.0, 2.0),
    minimum=(0.0, 0.0),
    xlim=(-10.0, 2.5),
    ylim=(-2.5, 2.5),
    levels=np.array([0.02, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4]),
    steps=40,
    optimizers={
        "Gradient descent": ("SGD", {"lr": 0.9}),
        "Momentum": ("SGD", {"lr": 0.5, "momentum": 0.7}),
        "RMSprop": ("RMSprop", {"lr": 0.1}),
        "Adam": ("Adam", {"lr": 0.3}),
    },
)

ROSENBROCK = Surface(
    title="Rosenbrock  f = (1 - x)² + 100 (y - x²)²",
    f=lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
    grad=lambda p: np.array([-2 * (1 - p[0]) - 400 * p[0] * (p[1] - p[0] ** 2), 200 * (p[1] - p[0] ** 2)]),
    start=(-1.5, 2.0),
    minimum=(1.0, 1.0),
    xlim=(-2.0, 2.0),
    ylim=(-0.75, 2.75),
    levels=np.logspace(-1, 3.5, 14),
    steps=2000,
    optimizers={
        "Gradient descent": ("SGD", {"lr": 1e-3}),
        "Momentum": ("SGD", {"lr": 2e-4, "momentum": 0.9}),
        "RMSprop": ("RMSprop", {"lr": 1e-2}),
        "Adam": ("Adam", {"lr": 5e-2}),
    },
)

# Drawn in this order, widest first, so a path running on top of another leaves it visible.
STYLE = {
    "Gradient descent": dict(color="tab:red", lw=4.0, alpha=0.55),
    "Momentum": dict(color="tab:blue", lw=2.6, alpha=0.8),
    "RMSprop": dict(color="tab:green", lw=1.6, alpha=0.9),
    "Adam": dict(color="tab:purple", lw=1.0, alpha=1.0),
}


# --- the fallback: torch.optim's rules, only for optimizers this gpuadam does not have yet --------
def _fallback_sgd(p, grad, steps, lr, momentum=0.0):
    buf = None
    out = [p.copy()]
    for _ in range(steps):
        g = grad(p)
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = buf
        p -= lr * g
        out.append(p.copy())
    return np.array(out)


def _fallback_rmsprop(p, grad, steps, lr, alpha=0.99, eps=1e-8):
    v = np.zeros_like(p)
    out = [p.copy()]
    for _ in range(steps):
        g = grad(p)
        v = alpha * v + (1 - alpha) * g * g
        p -= lr * g / (np.sqrt(v) + eps)
        out.append(p.copy())
    return np.array(out)


FALLBACKS = {"SGD": _fallback_sgd, "RMSprop": _fallback_rmsprop}


def path(surface: Surface, class_name: str, kwargs: dict, steps: int) -> tuple[np.ndarray, bool]:
    """The visited points (steps + 1, 2) and whether the script's NumPy fallback made them."""
    p = np.array(surface.start, dtype=np.float64)
    if not hasattr(gpuadam, class_name):
        return FALLBACKS[class_name](p, surface.grad, steps, **kwargs), True
    opt = getattr(gpuadam, class_name)([p], **kwargs)
    g = np.zeros_like(p)
    out = [p.copy()]
    for _ in range(steps):
        g[...] = surface.grad(p)
        opt.step([g])
        out.append(p.copy())
    return np.array(out), False


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def draw(ax, surface: Surface, quick: bool) -> list[str]:
    n = 120 if quick else 400
    x, y = np.meshgrid(np.linspace(*surface.xlim, n), np.linspace(*surface.ylim, n))
    ax.contour(x, y, surface.f(x, y), levels=surface.levels, colors="0.65", linewidths=0.7)
    steps = max(10, surface.steps // 10) if quick else surface.steps
    fell_back = []
    for label, (class_name, kwargs) in surface.optimizers.items():
        points, fallback = path(surface, class_name, kwargs, steps)
        if fallback:
            fell_back.append(label)
        final = float(surface.f(*points[-1]))
        note = " [NumPy fallback]" if fallback else ""
        style = STYLE[label]
        marker = "o" if len(points) <= 60 else None
        ax.plot(points[:, 0], points[:, 1], marker=marker, ms=3, **style,
                label=f"{label} ({_describe(kwargs)}){note}: ends at f = {final:.2g}")
        ax.plot(*points[-1], "o", color=style["color"], mec="k", ms=7, zorder=5)
    ax.plot(*surface.start, "ks", ms=6, label="start")
    ax.plot(*surface.minimum, "k*", ms=12, label="minimum (circles: where each path ends)", zorder=6)
    ax.set_xlim(surface.xlim)
    ax.set_ylim(surface.ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{surface.title}: {steps} steps from {surface.start}")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fell_back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="few steps and a coarse grid (for tests)")
    args = parser.parse_args(argv)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 11), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 1.6])
    fell_back = draw(top, BOWL, args.quick) + draw(bottom, ROSENBROCK, args.quick)
    fig.suptitle("Optimizer paths with gpuadam (torch.optim's update rules)", fontsize=13)
    if fell_back:
        fig.supxlabel("[NumPy fallback]: this gpuadam has no such optimizer yet; that path comes from a NumPy loop "
                      "in scripts/plot_paths.py with torch.optim's rule", fontsize=8, color="0.35")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}" + (f" (NumPy fallback for: {', '.join(sorted(set(fell_back)))})" if fell_back else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
