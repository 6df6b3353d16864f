"""Why Adam divides by ``1 - beta^t``: an exponential moving average with and without bias correction.

Adam's moments are exponential moving averages that start at zero, ``m_t = beta m_{t-1} + (1 - beta) g_t``
with ``m_0 = 0``. Unrolled, ``m_t`` weights the samples by ``(1 - beta) beta^(t-i)``, and those weights
sum to ``1 - beta^t``, not to 1: early on the average is pulled toward zero. Dividing by ``1 - beta^t``
makes the weights sum to 1 at every step; the correction fades out as ``beta^t -> 0``, the slower
the larger beta is. This script draws it for a noisy series and several betas (``docs/bias_correction.png``).

    python scripts/plot_bias_correction.py [--out docs/bias_correction.png] [--quick]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "bias_correction.png"
BETAS = (0.9, 0.98, 0.995)


def noisy_series(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A slowly varying signal around 10 and that signal plus Gaussian noise (sd 2)."""
    t = np.arange(1, n + 1)
    signal = 10 + 2 * np.sin(2 * np.pi * t / 250)
    return signal, signal + np.random.default_rng(seed).normal(0.0, 2.0, n)


def ema(x: np.ndarray, beta: float, bias_correction: bool) -> np.ndarray:
    """``m_t = beta m_{t-1} + (1 - beta) x_t`` from ``m_0 = 0``; divided by ``1 - beta^t`` if asked."""
    out = np.empty_like(x, dtype=np.float64)
    m = 0.0
    for t, value in enumerate(x, start=1):
        m = beta * m + (1 - beta) * value
        out[t - 1] = m / (1 - beta**t) if bias_correction else m
    return out


def steps_to_one_percent(beta: float) -> int:
    """The first t with ``beta^t < 0.01``: from then on the uncorrected EMA is less than 1% low."""
    return math.ceil(math.log(0.01) / math.log(beta))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="a short series (for tests)")
    args = parser.parse_args(argv)
    from matplotlib.figure import Figure

    n = 100 if args.quick else 500
    signal, x = noisy_series(n)
    t = np.arange(1, n + 1)
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, beta in zip(axes, BETAS):
        ax.plot(t, x, ".", color="0.72", ms=3, label="noisy series")
        ax.plot(t, signal, color="0.35", lw=1, ls=":", label="signal without noise")
        ax.plot(t, ema(x, beta, False), color="tab:red", lw=1.8, ls="--", label="EMA from 0, uncorrected")
        ax.plot(t, ema(x, beta, True), color="tab:blue", lw=1.8, label="EMA / (1 - βᵗ): bias-corrected")
        ax.set_title(f"β = {beta}: an average over about {1 / (1 - beta):g} samples\n"
                     f"uncorrected, it stays more than 1% low until t = {steps_to_one_percent(beta)}", fontsize=10)
        ax.set_xlabel("step t")
        ax.set_ylabel("value")
        ax.set_ylim(0, 18)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[-1]
    for beta, color in zip(BETAS, ("tab:orange", "tab:green", "tab:purple")):
        ax.plot(t, 1 - beta**t, color=color, lw=1.8, label=f"β = {beta}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_title("1 - βᵗ: the sum of the uncorrected EMA's weights,\nwhat the bias correction divides by", fontsize=10)
    ax.set_xlabel("step t")
    ax.set_ylabel("1 - βᵗ")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Bias correction: an exponential moving average that starts at 0 is pulled toward 0 until βᵗ fades\n"
                 "which is why Adam uses m̂ = m / (1 - β₁ᵗ) and v̂ = v / (1 - β₂ᵗ)", fontsize=12)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
