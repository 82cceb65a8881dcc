"""Agreement between predicted and reference measurements: Bland-Altman analysis and its plot.

Bland & Altman (Lancet 1986; Stat Methods Med Res 1999). For paired measurements p_i (ours) and r_i
(the sonographer's), d_i = p_i - r_i:

* bias = mean(d), positive when we measure too large;
* SD = sample standard deviation of d (n - 1 in the denominator);
* 95 % limits of agreement = bias +- 1.96 SD: about 95 % of the differences on new cases should fall
  between them if the differences are roughly normal and do not depend on the size of the abdomen (the
  plot shows whether they do);
* confidence intervals (t distribution, n - 1 degrees of freedom): bias +- t SD / sqrt(n), and for each
  limit +- t sqrt(3 SD^2 / n), the approximate standard error of a limit from the 1999 paper.

Only pairs where both values are finite numbers count; the caller says how many were left out (cases with
no frame chosen, no ellipse fitted, or no reference AC on the chosen sweep).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from training.scoring.report_plots import plt

Z_95 = 1.96


@dataclass(frozen=True)
class BlandAltman:
    n: int
    bias: float  # mean of predicted - reference
    sd: float  # sample SD of the differences (nan when n < 2)
    loa_low: float  # bias - 1.96 SD
    loa_high: float  # bias + 1.96 SD
    bias_ci: tuple[float, float]  # 95 % CI of the bias
    loa_low_ci: tuple[float, float]
    loa_high_ci: tuple[float, float]
    mean_abs_diff: float
    mean_abs_pct: float  # mean of |d| / r, in percent
    within_loa: int  # how many pairs lie inside the limits
    means: list[float] = field(default_factory=list, repr=False)  # (p + r) / 2, per pair
    diffs: list[float] = field(default_factory=list, repr=False)  # p - r, per pair

    def to_dict(self, with_points: bool = False) -> dict:
        out = asdict(self)
        if not with_points:
            out.pop("means")
            out.pop("diffs")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _t_quantile(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t with `dof` degrees of freedom."""
    return float(stats.t.ppf(0.975, dof))


def paired(predicted: Sequence[float | None], reference: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite numbers, as two float arrays."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted vs {len(reference)} reference values")
    keep = [(float(p), float(r)) for p, r in zip(predicted, reference)
            if p is not None and r is not None and math.isfinite(float(p)) and math.isfinite(float(r))]
    if not keep:
        return np.zeros(0), np.zeros(0)
    p, r = zip(*keep)
    return np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)


def bland_altman(predicted: Sequence[float | None], reference: Sequence[float | None]) -> BlandAltman:
    """Bias, limits of agreement and their confidence intervals of predicted vs reference values."""
    p, r = paired(predicted, reference)
    n = len(p)
    nan = float("nan")
    if n == 0:
        return BlandAltman(0, nan, nan, nan, nan, (nan, nan), (nan, nan), (nan, nan), nan, nan, 0)
    d = p - r
    bias = float(d.mean())
    mad = float(np.abs(d).mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = float(np.mean(np.abs(d) / r) * 100.0) if np.all(r > 0) else nan
    if n < 2:
        return BlandAltman(1, bias, nan, nan, nan, (nan, nan), (nan, nan), (nan, nan), mad, pct, 0,
                           [float((p + r)[0] / 2)], [bias])
    sd = float(d.std(ddof=1))
    low, high = bias - Z_95 * sd, bias + Z_95 * sd
    t = _t_quantile(n - 1)
    se_bias = sd / math.sqrt(n)
    se_loa = math.sqrt(3.0 * sd * sd / n)
    within = int(np.count_nonzero((d >= low) & (d <= high)))
    return BlandAltman(
        n=n, bias=bias, sd=sd, loa_low=low, loa_high=high,
        bias_ci=(bias - t * se_bias, bias + t * se_bias),
        loa_low_ci=(low - t * se_loa, low + t * se_loa),
        loa_high_ci=(high - t * se_loa, high + t * se_loa),
        mean_abs_diff=mad, mean_abs_pct=pct, within_loa=within,
        means=((p + r) / 2).tolist(), diffs=d.tolist(),
    )


def plot_bland_altman(predicted: Sequence[float | None], reference: Sequence[float | None], path: Path,
                      title: str = "Abdominal circumference", unit: str = "mm") -> BlandAltman:
    """Two panels, predicted vs reference (identity line) and the Bland-Altman plot; PNG at `path`."""
    result = bland_altman(predicted, reference)
    p, r = paired(predicted, reference)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    if len(p):
        low = float(min(p.min(), r.min()))
        high = float(max(p.max(), r.max()))
        pad = 0.05 * max(high - low, 1.0)
        left.plot([low - pad, high + pad], [low - pad, high + pad], color="0.5", lw=1, ls="--", label="identity")
        left.scatter(r, p, s=18, alpha=0.8, color="tab:blue", edgecolor="none")
        left.set_xlim(low - pad, high + pad)
        left.set_ylim(low - pad, high + pad)
        left.legend(loc="upper left", frameon=False)
    left.set_xlabel(f"reference AC ({unit})")
    left.set_ylabel(f"predicted AC ({unit})")
    left.set_title(f"{title}: predicted vs reference (n = {result.n})")
    left.set_aspect("equal", adjustable="box")

    if result.n:
        right.scatter(result.means, result.diffs, s=18, alpha=0.8, color="tab:blue", edgecolor="none")
        right.axhline(0.0, color="0.6", lw=1)
        lines = [(result.bias, f"bias {result.bias:+.1f}", "-", 1.5)]
        if result.n >= 2:
            lines += [(result.loa_high, f"+1.96 SD {result.loa_high:+.1f}", "--", 1.0),
                      (result.loa_low, f"-1.96 SD {result.loa_low:+.1f}", "--", 1.0)]
            right.axhspan(*result.bias_ci, color="tab:red", alpha=0.08, lw=0)
        for value, label, style, width in lines:
            right.axhline(value, color="tab:red", lw=width, ls=style)
            right.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                           textcoords="offset points", ha="right", fontsize=8, color="tab:red")
        values = result.diffs + [v for v, *_ in lines]
        span = max(max(values) - min(values), 1.0)
        right.set_ylim(min(values) - 0.12 * span, max(values) + 0.12 * span)
        right.set_title("Bland-Altman" + (" (shaded: 95 % CI of the bias)" if result.n >= 2 else ""))
    else:
        right.text(0.5, 0.5, "no case with both a predicted and a reference AC", ha="center", va="center",
                   transform=right.transAxes)
        right.set_title("Bland-Altman")
    right.set_xlabel(f"mean of predicted and reference ({unit})")
    right.set_ylabel(f"predicted - reference ({unit})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return result
