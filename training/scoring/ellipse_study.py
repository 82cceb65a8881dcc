"""How well do the AC ellipse fits measure an abdomen cut by the field of view?

    python -m training ellipse-study --out build/ellipse_study [--ellipses 150] [--seed 0] [--fov-mask F]

Draws abdomens of the real AC range (141-351 mm, minor/major axis 0.6-0.95, any orientation) placed so that
20-50 % of their area lies outside the FOV (`--fov-mask`, e.g. the challenge's `fov_mask.mha`; default
the replica's sector), turns each into the masks a segmentation could give (the drawn mask, eroded or
dilated walls, a noisy outline, a mask that stops a few pixels short of the FOV edge, ...), measures each
with every fit and compares the perimeter with the true one (the exact perimeter of the drawn ellipse).
Writes `table.md`, `results.json` (every measurement) and `examples.png` to `--out`.

The fits: the project's (`algorithm.biometry.fit_ellipse`, at its default edge band and at others) and the
official scorer's (`training.scoring.official.official_fit_ellipse`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy.special import ellipe

from algorithm.biometry import EDGE_TOLERANCE_PX, Ellipse, fit_ellipse
from algorithm.config import PIXEL_SPACING_MM
from training.cli import CommandParser, number
from training.data.replica import sector_fov
from training.scoring.evaluate import read_fov_mask
from training.scoring.official import official_fit_ellipse

AC_RANGE_MM = (141.0, 351.0)  # the public training set's reference ACs
ASPECT_RANGE = (0.6, 0.95)  # minor / major semi-axis: oblique to round cuts
CUT_RANGE = (0.2, 0.5)  # share of the abdomen's area outside the FOV
WALL_PX = 3  # erosion / dilation of a predicted wall
NOISE_SD_PX = 2.0  # s.d. of the radial noise of a noisy outline


@dataclass(frozen=True)
class TrueEllipse:
    center: tuple[float, float]
    semi_axes: tuple[float, float]  # major first, px
    angle_deg: float
    cut: float  # share of the area outside the FOV

    @property
    def perimeter_px(self) -> float:
        """The exact perimeter, 4 a E(1 - b^2 / a^2)."""
        a, b = self.semi_axes
        return 4.0 * a * float(ellipe(1.0 - (b / a) ** 2))

    def box(self) -> tuple:
        return self.center, (2 * self.semi_axes[0], 2 * self.semi_axes[1]), self.angle_deg

    def draw(self, shape: tuple[int, int], offset: int = 0) -> np.ndarray:
        canvas = np.zeros(shape, np.uint8)
        (cx, cy), axes, angle = self.box()
        cv2.ellipse(canvas, ((cx + offset, cy + offset), axes, angle), 1, -1)
        return canvas


def outside_share(center: tuple[float, float], semi_axes: tuple[float, float], angle: float,
                  fov: np.ndarray) -> float:
    """Share of the whole ellipse's area (drawn on a canvas larger than the frame) outside `fov`."""
    pad = int(2 * semi_axes[0]) + 2
    h, w = fov.shape
    whole = TrueEllipse(center, semi_axes, angle, 0.0).draw((h + 2 * pad, w + 2 * pad), pad).astype(bool)
    inside = whole[pad:pad + h, pad:pad + w] & fov
    return 1.0 - inside.sum() / max(int(whole.sum()), 1)


def place_ellipses(rng: np.random.Generator, n: int, fov: np.ndarray,
                   cut_range: tuple[float, float] = CUT_RANGE) -> list[TrueEllipse]:
    """`n` random abdomens, each with a cut share drawn uniformly from `cut_range`.

    The centre starts on a random FOV edge pixel and moves along the line towards the FOV's centroid until
    the outside share reaches the target (bisection; the share falls as the centre moves in).
    """
    edge = cv2.findContours(fov.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]
    edge = max(edge, key=len).reshape(-1, 2).astype(np.float64)
    centroid = np.argwhere(fov)[:, ::-1].mean(axis=0)
    unit_perimeter = lambda q: math.pi * (3 * (1 + q) - math.sqrt((3 + q) * (1 + 3 * q)))  # noqa: E731
    placed: list[TrueEllipse] = []
    while len(placed) < n:
        q = rng.uniform(*ASPECT_RANGE)
        a = rng.uniform(*AC_RANGE_MM) / PIXEL_SPACING_MM / unit_perimeter(q)
        axes, angle = (a, q * a), float(rng.uniform(0.0, 180.0))
        target = rng.uniform(*cut_range)
        start = edge[rng.integers(len(edge))]
        direction = (centroid - start) / np.linalg.norm(centroid - start)
        lo, hi = -a, 2.0 * a  # distance along the line: lo -> share high, hi -> share low
        for _ in range(18):
            mid = (lo + hi) / 2.0
            share = outside_share(tuple(start + mid * direction), axes, angle, fov)
            lo, hi = (mid, hi) if share > target else (lo, mid)
        center = tuple(float(v) for v in start + (lo + hi) / 2.0 * direction)
        share = outside_share(center, axes, angle, fov)
        if abs(share - target) < 0.02:
            placed.append(TrueEllipse(center, axes, angle, share))
    return placed


# --------------------------------------------------------------------------------- predicted edges

def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _noisy_outline(truth: TrueEllipse, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The ellipse with its radius perturbed by smooth noise (harmonics 3-24, s.d. NOISE_SD_PX)."""
    t = np.linspace(0.0, 2 * math.pi, 2048, endpoint=False)
    ks = np.arange(3, 25)
    amplitudes, phases = rng.normal(size=len(ks))[:, None] / ks[:, None], rng.uniform(0, 6.3, len(ks))[:, None]
    noise = (amplitudes * np.cos(ks[:, None] * t + phases)).sum(0)
    noise *= NOISE_SD_PX / noise.std()
    a, b = truth.semi_axes
    x, y = a * np.cos(t), b * np.sin(t)
    scale = 1.0 + noise / np.hypot(x, y)
    phi = math.radians(truth.angle_deg)
    px = truth.center[0] + scale * (x * math.cos(phi) - y * math.sin(phi))
    py = truth.center[1] + scale * (x * math.sin(phi) + y * math.cos(phi))
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(np.stack([px, py], 1) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return canvas


def _short_of_edge(fov: np.ndarray, px: int) -> np.ndarray:
    """The FOV without its outer `px` pixels (chessboard distance), where a mask that stops short ends."""
    return cv2.erode(fov.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8), borderValue=0) > 0


Condition = Callable[[TrueEllipse, np.ndarray, np.random.Generator], np.ndarray]


def conditions() -> dict[str, Condition]:
    """Name -> a function (truth, fov, rng) -> (H, W) uint8 predicted mask."""
    def drawn(truth, fov, rng):
        return truth.draw(fov.shape) & fov

    def eroded(truth, fov, rng):
        return cv2.erode(truth.draw(fov.shape), _disc(WALL_PX)) & fov

    def dilated(truth, fov, rng):
        return cv2.dilate(truth.draw(fov.shape), _disc(WALL_PX)) & fov

    def noisy(truth, fov, rng):
        return _noisy_outline(truth, fov.shape, rng) & fov

    def short(px: int, base: Condition = drawn) -> Condition:
        return lambda truth, fov, rng: base(truth, fov, rng) & _short_of_edge(fov, px)

    return {
        "drawn": drawn,
        f"eroded {WALL_PX} px": eroded,
        f"dilated {WALL_PX} px": dilated,
        f"noisy outline (s.d. {NOISE_SD_PX:g} px)": noisy,
        "stops 1 px short of the FOV edge": short(1),
        "stops 2 px short of the FOV edge": short(2),
        "stops 3 px short of the FOV edge": short(3),
        "stops 5 px short of the FOV edge": short(5),
        "noisy, stops 2 px short": short(2, noisy),
    }


Fit = Callable[[np.ndarray, np.ndarray], Ellipse | None]


def fits(bands: Sequence[int] = (2, EDGE_TOLERANCE_PX, 6)) -> dict[str, Fit]:
    """Name -> fit(mask, fov): the project's fit at each edge band (px), then the official scorer's."""
    chosen: dict[str, Fit] = {}
    for band in bands:
        chosen[f"project, {band} px band"] = lambda m, f, band=band: fit_ellipse(m, f, edge_tolerance_px=band)
    chosen["official"] = official_fit_ellipse
    return chosen


# --------------------------------------------------------------------------------- the study

def run_study(truths: Sequence[TrueEllipse], fov: np.ndarray, seed: int = 0,
              chosen_conditions: dict[str, Condition] | None = None,
              chosen_fits: dict[str, Fit] | None = None) -> list[dict]:
    """One record per (ellipse, condition, fit): the relative perimeter error, None when no fit."""
    chosen_conditions = chosen_conditions or conditions()
    chosen_fits = chosen_fits or fits()
    records = []
    for i, truth in enumerate(truths):
        for name, make in chosen_conditions.items():
            mask = make(truth, fov, np.random.default_rng([seed, i]))
            for fit_name, fit in chosen_fits.items():
                ellipse = fit(mask, fov)
                error = None if ellipse is None else ellipse.perimeter_px / truth.perimeter_px - 1.0
                records.append({"ellipse": i, "condition": name, "fit": fit_name, "error": error,
                                "cut": truth.cut, "ac_mm": truth.perimeter_px * PIXEL_SPACING_MM})
    return records


def summarise(records: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """condition -> fit -> {mean, mean_abs, max_abs, failures, n} of the relative errors."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        table.setdefault(r["condition"], {}).setdefault(r["fit"], []).append(r["error"])
    out = {}
    for condition, by_fit in table.items():
        out[condition] = {}
        for fit_name, errors in by_fit.items():
            values = np.array([e for e in errors if e is not None], dtype=np.float64)
            out[condition][fit_name] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "mean_abs": float(np.abs(values).mean()) if len(values) else math.nan,
                "max_abs": float(np.abs(values).max()) if len(values) else math.nan,
                "failures": len(errors) - len(values), "n": len(errors)}
    return out


def markdown_table(summary: dict, fit_names: Sequence[str]) -> str:
    """Rows: conditions; cells: mean / mean |error| / max |error| in %, and the count of fits that failed."""
    lines = ["| predicted mask | " + " | ".join(fit_names) + " |",
             "|---|" + "---|" * len(fit_names)]
    for condition, by_fit in summary.items():
        cells = []
        for name in fit_names:
            s = by_fit[name]
            cell = f"{100 * s['mean']:+.2f} / {100 * s['mean_abs']:.2f} / {100 * s['max_abs']:.1f}"
            cells.append(cell + (f" ({s['failures']} failed)" if s["failures"] else ""))
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def example_picture(truths: Sequence[TrueEllipse], fov: np.ndarray, seed: int,
                    rows: Sequence[tuple[int, str]], fit_names: Sequence[str],
                    colours: Sequence[tuple[int, int, int]], tile: int = 300) -> np.ndarray:
    """A grid of (ellipse, condition) tiles: FOV (dark grey), mask (grey), true ellipse (white) and each
    fit (its colour), cropped around the abdomen, with each fit's error."""
    named = conditions()
    all_fits = fits()
    tiles = []
    for i, condition in rows:
        truth = truths[i]
        mask = named[condition](truth, fov, np.random.default_rng([seed, i]))
        pad = 300
        h, w = fov.shape
        canvas = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
        canvas[pad:pad + h, pad:pad + w][fov] = (45, 45, 45)
        canvas[pad:pad + h, pad:pad + w][mask > 0] = (120, 120, 120)
        (cx, cy), axes, angle = truth.box()
        cv2.ellipse(canvas, ((cx + pad, cy + pad), axes, angle), (255, 255, 255), 1, cv2.LINE_AA)
        lines = [f"{condition}, cut {100 * truth.cut:.0f} %"]
        for name, colour in zip(fit_names, colours):
            ellipse = all_fits[name](mask, fov)
            if ellipse is None:
                lines.append(f"{name}: no fit")
                continue
            (ex, ey), eaxes, eangle = ellipse.to_cv()
            cv2.ellipse(canvas, ((ex + pad, ey + pad), eaxes, eangle), colour, 2, cv2.LINE_AA)
            lines.append(f"{name}: {100 * (ellipse.perimeter_px / truth.perimeter_px - 1):+.1f} %")
        half = int(max(truth.semi_axes) * 1.25)
        x0, y0 = int(cx + pad - half), int(cy + pad - half)
        crop = canvas[max(y0, 0):y0 + 2 * half, max(x0, 0):x0 + 2 * half]
        crop = cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_AREA)
        for k, text in enumerate(lines):
            colour = (255, 255, 255) if k == 0 else colours[fit_names.index(text.split(":")[0])]
            cv2.putText(crop, text, (6, 16 + 15 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA)
        tiles.append(crop)
    columns = 3
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    return np.vstack([np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)])


def example_rows(records: Sequence[dict], chosen: str) -> list[tuple[int, str]]:
    """(ellipse, condition) pairs worth looking at: where the fits part ways, and the chosen fit's worst."""
    def pick(condition: str, fit: str, key: Callable[[float | None], float]) -> list[tuple[int, str]]:
        found = [r for r in records if r["condition"] == condition and r["fit"] == fit]
        return [(max(found, key=lambda r: key(r["error"]))["ellipse"], condition)] if found else []

    magnitude = lambda e: math.inf if e is None else abs(e)  # noqa: E731
    rows = pick("stops 3 px short of the FOV edge", chosen, lambda e: -magnitude(e))
    rows += pick("drawn", "official", magnitude) + pick("dilated 3 px", "official", magnitude)
    rows += pick("drawn", chosen, magnitude) + pick(f"eroded {WALL_PX} px", chosen, magnitude)
    rows += pick(f"noisy outline (s.d. {NOISE_SD_PX:g} px)", chosen, magnitude)
    return rows


def read_fov(path: Path | None) -> tuple[np.ndarray, str]:
    if path is None:
        return sector_fov(), "the replica's sector"

    return read_fov_mask(path), str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training ellipse-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md, results.json, examples.png")
    parser.add_argument("--ellipses", type=number(int, minimum=1), default=150, help="abdomens placed in the FOV")
    parser.add_argument("--seed", type=int, default=0, help="seed of the abdomens' placement")
    parser.add_argument("--fov-mask", type=Path, help="(H, W) FOV .mha (default: the replica's sector)")
    args = parser.parse_args(argv)
    try:
        fov, fov_name = read_fov(args.fov_mask)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    truths = place_ellipses(np.random.default_rng(args.seed), args.ellipses, fov)
    records = run_study(truths, fov, args.seed)
    summary = summarise(records)
    fit_names = list(fits())
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"{args.ellipses} abdomens, AC {AC_RANGE_MM[0]:g}-{AC_RANGE_MM[1]:g} mm, "
              f"{100 * CUT_RANGE[0]:.0f}-{100 * CUT_RANGE[1]:.0f} % of the area outside the FOV ({fov_name}), "
              f"seed {args.seed}. Perimeter error against the true perimeter, in %: "
              "mean / mean of |error| / max |error|.\n\n")
    table = header + markdown_table(summary, fit_names)
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(
        {"fov": fov_name, "seed": args.seed, "ellipses": [t.__dict__ for t in truths], "summary": summary,
         "records": records}, indent=1))

    chosen = f"project, {EDGE_TOLERANCE_PX} px band"
    picture = example_picture(truths, fov, args.seed, example_rows(records, chosen), [fit_names[0], chosen, "official"],
                              [(60, 60, 255), (80, 220, 80), (255, 160, 60)])
    cv2.imwrite(str(args.out / "examples.png"), picture)
    print(table)
    print(f"{len(records)} fits in {time.perf_counter() - start:.1f} s; wrote {args.out}/table.md, "
          "results.json, examples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
