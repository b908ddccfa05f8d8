"""Accuracy against training compute: the paper's fit P(C) = A / C^alpha + P*, and the plots.

The RPT paper (Sec. 4, Fig. 5) fits next-token reasoning accuracy per difficulty split against
training compute C with P(C) = A / C^alpha + P* (R^2 about 0.99). Accuracy rises with compute,
so a good fit has alpha > 0, A < 0 and P* the asymptote above the measured points.

C is training FLOPs, `training_compute` = 6 * params * tokens processed (the usual dense
estimate: 2 forward + 4 backward FLOPs per parameter per token), counted from RL step 0: a
format warm-up before it (rpt_jax.warmup, for models that start from random weights) is not
part of C, as the paper's C starts from its pretrained model.

scipy and matplotlib are optional (extras "eval"/"test"); they are imported inside the functions
that need them, so the training runtime never loads them.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """P(C) = a / C^alpha + p_star, with its goodness of fit (r2) on the fitted points."""
    a: float
    alpha: float
    p_star: float
    r2: float
    num_points: int

    def __call__(self, compute) -> np.ndarray:
        return power_law(np.asarray(compute, np.float64), self.a, self.alpha, self.p_star)

    def describe(self) -> str:
        return (f"P(C) = {self.a:.4g} / C^{self.alpha:.4g} + {self.p_star:.4g}   "
                f"(R^2 = {self.r2:.4f}, {self.num_points} points)")


def power_law(compute, a, alpha, p_star):
    """P(C) = a / C^alpha + p_star, elementwise; compute > 0."""
    return a * np.power(compute, -alpha) + p_star


def training_compute(num_params: int, tokens) -> np.ndarray:
    """Training FLOPs C = 6 * num_params * tokens (tokens processed, scalar or array)."""
    return 6.0 * float(num_params) * np.asarray(tokens, np.float64)


def cumulative_tokens(records: Sequence[Mapping], steps: Sequence[int],
                      prompt_tokens_per_step: float, tokens_per_step: float) -> np.ndarray:
    """Tokens processed by training up to each of `steps` (the D of C = 6 N D).

    records: the trainer's per-step metrics (metrics.jsonl "train" records: "step" counts
    updates done, "sampled_tokens" the response tokens of that step, "prompt_tokens" if logged).
    A record stands for the steps since the previous record (logging.every > 1); a step's
    tokens are its sampled tokens plus its prompt tokens, or `prompt_tokens_per_step` where a
    record has none. Steps beyond the last record, or every step without records, count
    `tokens_per_step` each. Returns float64 [len(steps)].
    """
    rec = sorted((int(r["step"]), float(r["sampled_tokens"])
                  + float(r.get("prompt_tokens", prompt_tokens_per_step)))
                 for r in records if "sampled_tokens" in r)
    # (step, tokens up to it, tokens a step of the records' span ending there)
    marks, prev, total = [], 0, 0.0
    for step, tokens in rec:
        if step > prev:
            total += (step - prev) * tokens
            marks.append((step, total, tokens))
            prev = step
    out = []
    for s in steps:
        done = [m for m in marks if m[0] <= s]
        last_step, last_total = (done[-1][0], done[-1][1]) if done else (0, 0.0)
        after = next((m[2] for m in marks if m[0] > s), tokens_per_step)  # s is inside its span
        out.append(last_total + (s - last_step) * after)
    return np.asarray(out, np.float64)


def r_squared(y, y_hat) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (1.0 for a perfect fit of constant y)."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def _linear_given_alpha(x, y, alpha):
    """Least squares for (a, p_star) at fixed alpha, x = C / C0. Returns (a, p_star, sse)."""
    design = np.stack([np.power(x, -alpha), np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef[0], coef[1], float(np.sum((design @ coef - y) ** 2))


def fit_power_law(compute: Sequence[float], accuracy: Sequence[float],
                  max_alpha: float = 5.0) -> PowerLawFit:
    """Fit P(C) = A / C^alpha + P* by nonlinear least squares (scipy.optimize.curve_fit).

    compute [n] > 0 (FLOPs or any proxy proportional to them); accuracy [n]; needs n >= 3
    distinct compute values. C is divided by its geometric mean inside the fit so that the
    problem is well scaled for C ~ 1e20; A is reported in the units of `compute`. The start
    point comes from a grid over alpha with (A, P*) solved linearly at each alpha, so the
    nonlinear solver starts in the right basin. alpha is kept in [0, max_alpha].
    """
    from scipy.optimize import curve_fit  # lazy: optional dependency

    c = np.asarray(compute, np.float64).reshape(-1)
    y = np.asarray(accuracy, np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"fit_power_law: compute {c.shape} and accuracy {y.shape} differ in shape")
    ok = np.isfinite(c) & np.isfinite(y)
    c, y = c[ok], y[ok]
    if np.any(c <= 0):
        raise ValueError(f"fit_power_law: compute must be > 0, got min {c.min()}")
    if len(np.unique(c)) < 3:
        raise ValueError(f"fit_power_law: needs >= 3 distinct compute values, got {len(np.unique(c))}")
    c0 = float(np.exp(np.mean(np.log(c))))
    x = c / c0

    grid = np.linspace(1e-3, max_alpha, 200)
    best = min((_linear_given_alpha(x, y, al) + (al,) for al in grid), key=lambda r: r[2])
    p0 = (best[0], best[3], best[1])
    f = lambda xx, a, alpha, p_star: power_law(xx, a, alpha, p_star)  # noqa: E731
    try:
        (a, alpha, p_star), _ = curve_fit(
            f, x, y, p0=p0, bounds=([-np.inf, 0.0, -np.inf], [np.inf, max_alpha, np.inf]),
            maxfev=20_000)
    except RuntimeError:  # no convergence: the grid optimum is still a least-squares answer
        a, alpha, p_star = p0
    if np.sum((f(x, a, alpha, p_star) - y) ** 2) > best[2]:
        a, alpha, p_star = p0
    r2 = r_squared(y, f(x, a, alpha, p_star))
    # a / (C/c0)^alpha = (a * c0^alpha) / C^alpha
    return PowerLawFit(a=float(a * c0 ** alpha), alpha=float(alpha), p_star=float(p_star),
                       r2=float(r2), num_points=int(len(c)))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_vs_step(steps: Sequence[int], series: Mapping[str, Sequence[float]], path: str,
                 title: str = "accuracy vs training step", ylabel: str = "accuracy (%)") -> str:
    """Line plot of each named series against training step; writes a PNG to `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_vs_compute(compute: Sequence[float], series: Mapping[str, Sequence[float]],
                    fits: Mapping[str, PowerLawFit], path: str,
                    title: str = "accuracy vs training compute",
                    xlabel: str = "training compute C (FLOPs)",
                    ylabel: str = "accuracy (%)") -> str:
    """Points of each series against compute (log x axis) with its fitted curve; writes a PNG."""
    plt = _pyplot()
    c = np.asarray(compute, np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.geomspace(c[c > 0].min(), c.max(), 200) if np.any(c > 0) else None
    for name, values in series.items():
        line = ax.plot(c, values, marker="o", linestyle="none", label=name)[0]
        fit = fits.get(name)
        if fit is not None and grid is not None:
            ax.plot(grid, fit(grid), color=line.get_color(),
                    label=f"fit: alpha={fit.alpha:.3g}, P*={fit.p_star:.3g}, R²={fit.r2:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
