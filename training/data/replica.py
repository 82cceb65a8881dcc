"""A replica of the ACOUSLIC-AI public training set: synthetic blind-sweep stacks, masks and reference ACs.

The real release cannot ship with the project, yet every stage (data loading, training, the container, the
scorer) needs cases in exactly its form. This module writes them:

* `images/stacked_fetal_ultrasound/<uuid>.mha`: uint8 (6 K, 562, 744) stacks, 6 sweeps of K frames;
* `masks/stacked_fetal_abdomen/<uuid>.mha`: same geometry, 0 background, 1 optimal plane, 2 suboptimal;
* `circumferences/fetal_abdominal_circumferences_per_sweep.csv`: the reference AC of each annotated sweep.

Frames look like the real ones (dark, low contrast, coarse speckle, bright near-field layers, fluid pockets,
distractors such as a fetal skull or a femur) inside the challenge's convex-probe sector. The fetal abdomen
is visible only on the annotated frames (plus at most one faint frame at each end of a run); optimal frames
show the landmarks a sonographer looks for (stomach bubble, spine, umbilical vein), suboptimal frames an
obliquely cut, more elongated abdomen without them. The annotation statistics (how many sweeps, how long
the runs, where in the sweep, how often an optimal plane exists, the AC distribution) are parameters of
`ReplicaConfig`, derived from the real training set's statistics.

Generation is split in two steps so each can be tested on its own: `plan_case` draws what a case contains
(cheap: no pixels), `render_case` draws the pixels. `generate_case` does both and measures the reference
AC the way the challenge does, with `algorithm.biometry`.

Speed: frames are composed at half resolution (speckle is coarse anyway) and upsampled once. Speckle is
partly drawn on the probe's beam grid, so the far field shows a convex probe's radial streaks, and is
cross-faded between neighbouring frames, so consecutive frames are correlated like in a real sweep; all
its linear steps run once per key field, not once per frame, so a full-size case takes seconds.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from algorithm.biometry import circumference_mm
from algorithm.config import PIXEL_SPACING_MM, SWEEPS_PER_CASE
from training.cli import CommandParser, number
from training.data.layout import CIRCUMFERENCES_CSV, CIRCUMFERENCES_HEADER, image_path, mask_path

LABEL_OPTIMAL, LABEL_SUBOPTIMAL = 1, 2
# Frames per sweep of the real release; run lengths and positions are defined at this scale and scaled
# proportionally when a smaller `frames_per_sweep` is asked for.
REAL_FRAMES_PER_SWEEP = 140
MIN_FRAMES_PER_SWEEP = 4  # the smallest sweep the run planner accepts (fast tests use 4-12)
REPLICA_MARKER = "replica.json"  # written next to the release folders
WALL_ARCS = 24  # the abdominal wall is drawn as this many arcs of their own brightness


# --------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class SectorGeometry:
    """The convex probe's image sector, in pixels of a 562 x 744 frame (x right, y down).

    Derived once from the challenge's `fov_mask.mha`: an annular sector (apex above the image, inner and
    outer arcs centred on it, straight sides) fitted by maximising its IoU with the mask (Nelder-Mead,
    started from the visual estimate). The fit reproduces the mask to IoU 0.99997 (7 pixels differ).
    """

    apex_x: float = 372.0
    apex_y: float = -184.72
    r_inner: float = 212.72
    r_outer: float = 747.73
    half_angle_deg: float = 29.884
    height: int = 562
    width: int = 744

    def resized(self, height: int, width: int) -> "SectorGeometry":
        """The same sector for another frame size (uniform scale by width, apex kept centred)."""
        if (height, width) == (self.height, self.width):
            return self
        s = width / self.width
        return SectorGeometry(self.apex_x * s, self.apex_y * s, self.r_inner * s, self.r_outer * s,
                              self.half_angle_deg, height, width)

    def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Radius from the apex (px) and beam angle (degrees, 0 straight down, positive towards +x)."""
        dx, dy = x - self.apex_x, y - self.apex_y
        return np.hypot(dx, dy), np.degrees(np.arctan2(dx, dy))

    def contains(self, x: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether points lie inside the sector, at least `margin` px from its arcs (and roughly its sides)."""
        r, theta = self.polar(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        side = np.radians(self.half_angle_deg - np.abs(theta)) * r  # distance to the side, small angles
        return ((r >= self.r_inner + margin) & (r <= self.r_outer - margin) & (side >= margin)
                & (x >= 0) & (x <= self.width - 1) & (y >= 0) & (y <= self.height - 1))

    def beam_direction(self, x: float, y: float) -> np.ndarray:
        """Unit vector along the beam through (x, y), pointing away from the probe."""
        d = np.array([x - self.apex_x, y - self.apex_y], dtype=np.float64)
        return d / max(float(np.hypot(*d)), 1e-6)


def sector_fov(height: int = 562, width: int = 744, geometry: SectorGeometry | None = None) -> np.ndarray:
    """Boolean (height, width) field of view of the generator (matches the challenge's FOV mask)."""
    geometry = (geometry or SectorGeometry()).resized(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r, theta = geometry.polar(x, y)
    return (r >= geometry.r_inner) & (r <= geometry.r_outer) & (np.abs(theta) <= geometry.half_angle_deg)


# --------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ReplicaConfig:
    """Everything the generator draws from. Statistics are derived from the real public training set.

    Real-set figures behind the defaults (300 cases): 2.6 % of frames annotated; 62 % of cases have an
    optimal frame, one case has no annotation; annotated sweeps per case 1/2/3/4 = 42/36/17/5 %, more in
    cases with an optimal plane; sweep 1 is annotated most often (sweep 6 least); per annotated sweep the
    runs form one contiguous block whose pattern is S (58 %), O, SO, OS or SOS; optimal runs median 8
    frames (IQR 5-12, max 26), suboptimal runs median 7 (IQR 4-11, max 32); blocks start around a third
    into the sweep; reference AC 141-351 mm, mean 232, s.d. 45; about 7 % of subjects have two cases.
    """

    frames_per_sweep: int = REAL_FRAMES_PER_SWEEP
    height: int = 562
    width: int = 744
    spacing_mm: float = PIXEL_SPACING_MM
    # Spacing between frames; not documented for the release. The organisers' baseline algorithm writes its
    # output stacks with 0.28 mm on all three axes, and the nnU-Net plans shipped with it record 0.28 mm
    # on all three axes of their training stacks; we follow them. The algorithm only copies it to its output.
    frame_spacing_mm: float = PIXEL_SPACING_MM
    # zlib levels of the .mha files. Speckle barely compresses: level 1 writes a 840-frame stack in a third
    # of the time of the default 6 for a 35 % bigger file; masks are mostly zeros and cheap at 6.
    compression_level: int = 1
    mask_compression_level: int = 6

    # --- annotation statistics
    p_case_optimal: float = 0.62
    p_pair_with_previous: float = 0.068  # a case is the second case of the previous case's subject
    # P(number of annotated sweeps = 0, 1, 2, 3, 4), for cases with / without an optimal frame.
    sweeps_if_optimal: tuple[float, ...] = (0.0, 0.31, 0.375, 0.235, 0.08)
    sweeps_if_suboptimal_only: tuple[float, ...] = (0.01, 0.60, 0.335, 0.055, 0.0)
    sweep_weights: tuple[float, ...] = (0.43, 0.24, 0.16, 0.06, 0.085, 0.025)
    p_extra_optimal_sweep: float = 0.22  # further annotated sweeps of an optimal case that have one too
    optimal_patterns: tuple[tuple[str, float], ...] = (("O", 0.34), ("SO", 0.24), ("OS", 0.23), ("SOS", 0.19))
    optimal_run: tuple[float, float, int] = (8.0, 0.60, 26)  # lognormal median, sigma, max (frames)
    suboptimal_run: tuple[float, float, int] = (7.0, 0.70, 32)
    block_start: tuple[float, float] = (0.30, 0.14)  # start of the annotated block, fraction of the sweep

    # --- the abdomen
    ac_mm: tuple[float, float] = (232.0, 45.0)  # mean, s.d. of the case's AC
    ac_range_mm: tuple[float, float] = (141.0, 351.0)
    ac_sweep_jitter: float = 0.03  # relative s.d. of a sweep's AC around the case's
    optimal_aspect: tuple[float, float] = (0.82, 0.95)  # minor / major semi-axis
    suboptimal_aspect: tuple[float, float] = (0.60, 0.76)  # oblique cuts are elongated ...
    suboptimal_oversize: tuple[float, float] = (1.0, 1.08)  # ... and a little larger
    size_falloff: float = 0.15  # relative size loss from the run's best frame to the frame past its end
    p_cut_by_fov: float = 0.15
    p_faint_end: float = 0.5  # a faint, unannotated abdomen frame just before / after the run
    faint_visibility: float = 0.3
    drift_px_per_frame: float = 1.0  # s.d. of the abdomen's drift, at 140 frames per sweep
    spin_deg_per_frame: float = 0.4

    # --- distractors and artefacts
    p_head: float = 0.6
    head_frames: tuple[int, int] = (8, 30)
    p_bone_per_sweep: float = 0.45
    bone_frames: tuple[int, int] = (3, 12)
    p_liftoff_per_end: float = 0.5  # a sweep end where the probe is off the skin for a few frames
    liftoff_frames: tuple[int, int] = (1, 6)

    # --- appearance
    brightness: float = 50.0  # grey level of average tissue at mid depth, before speckle
    attenuation_per_px: tuple[float, float] = (0.0018, 0.0032)
    speckle_beams: int = 360  # beam-grid columns across the sector
    speckle_beam_sigma: tuple[float, float] = (3.5, 0.8)  # correlation on the beam grid: (depth px/2, beams)
    speckle_grain_sigma: float = 1.0  # correlation of the isotropic grain, half-res px
    speckle_near_depth: float = 120.0  # px below the skin over which the fine grain gives way to streaks
    # Exponent on the Rayleigh amplitude: below 1 mimics the scanner's log compression (less contrast).
    speckle_contrast: float = 0.5
    speckle_smoothing: float = 0.6  # Gaussian sigma (half-res px) applied to the speckle amplitude
    speckle_frames: float = 3.0  # frames over which speckle decorrelates
    knee: float = 130.0  # grey level above which echoes are compressed by `knee_slope`
    knee_slope: float = 0.35
    noise_floor: float = 0.9  # electronic noise, keeps the sector non-zero on most frames
    field_step_frames: int = 6  # key-frame step of the slowly changing tissue / fluid fields

    def __post_init__(self) -> None:
        if self.frames_per_sweep < MIN_FRAMES_PER_SWEEP:
            raise ValueError(f"frames_per_sweep must be at least {MIN_FRAMES_PER_SWEEP}, got {self.frames_per_sweep}")

    @property
    def frames(self) -> int:
        return SWEEPS_PER_CASE * self.frames_per_sweep

    @property
    def time_scale(self) -> float:
        """Frames of this config per frame of the real 140-frame sweeps."""
        return self.frames_per_sweep / REAL_FRAMES_PER_SWEEP

    @property
    def geometry(self) -> SectorGeometry:
        return SectorGeometry().resized(self.height, self.width)


# ------------------------------------------------------------------------------------------------ plan

@dataclass(frozen=True)
class Run:
    """Consecutive annotated frames with one label; `start` inclusive, `stop` exclusive, stack indices."""

    start: int
    stop: int
    label: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EllipseView:
    """An ellipse on one frame, full-resolution px: centre, semi-axes (major first), angle (deg, like cv2)."""

    center: tuple[float, float]
    semi_axes: tuple[float, float]
    angle_deg: float

    def points(self, n: int = 72, scale: float = 1.0) -> np.ndarray:
        """(n, 2) points on the ellipse (or on a concentric copy scaled by `scale`)."""
        t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        return self.local_to_image(scale * self.semi_axes[0] * np.cos(t), scale * self.semi_axes[1] * np.sin(t))

    def draw_mask(self, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
        """Boolean (H, W) raster of the filled ellipse (or of a concentric copy scaled by `scale`)."""
        out = np.zeros(shape, dtype=np.uint8)
        axes = (_fx(scale * self.semi_axes[0]), _fx(scale * self.semi_axes[1]))
        cv2.ellipse(out, (_fx(self.center[0]), _fx(self.center[1])), axes, self.angle_deg, 0.0, 360.0, 1, -1,
                    cv2.LINE_8, _SHIFT)
        return out > 0

    def local_to_image(self, u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        """Image coordinates of points given along the major (u) and minor (v) axes."""
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        return np.stack([self.center[0] + c * u - s * v, self.center[1] + s * u + c * v], axis=-1)


@dataclass(frozen=True)
class AbdomenView:
    """The fetal abdomen on one frame and what it shows."""

    ellipse: EllipseView
    label: int  # LABEL_OPTIMAL, LABEL_SUBOPTIMAL, or 0 for a faint unannotated frame
    visibility: float  # 1 on annotated frames
    spine_deg: float  # direction of the spine in the ellipse's parametric angle
    stomach_side: int  # +1 / -1: which side of the spine-navel axis the stomach lies on
    spine_in_oblique: bool  # suboptimal frames: the spine shows as an oblique bright streak
    ribs: int  # suboptimal frames: rib echoes on the wall
    wall: tuple[float, ...]  # relative echo strength of the wall in equal arcs (gaps where it is missing)


@dataclass(frozen=True)
class HeadView:
    ellipse: EllipseView
    visibility: float


@dataclass(frozen=True)
class BoneView:
    p0: tuple[float, float]
    p1: tuple[float, float]
    thickness: float
    visibility: float


@dataclass(frozen=True)
class CasePlan:
    """What one case contains, before any pixel is drawn."""

    uuid: str
    pair_with_previous: bool
    frames_per_sweep: int
    runs: tuple[Run, ...]
    target_ac_mm: tuple[float | None, ...]  # per sweep: the AC the abdomen is drawn with
    abdomen: dict[int, AbdomenView] = field(default_factory=dict)
    heads: dict[int, HeadView] = field(default_factory=dict)
    bones: dict[int, tuple[BoneView, ...]] = field(default_factory=dict)
    gain: dict[int, float] = field(default_factory=dict)  # frames with reduced gain; 0 = probe lifted off

    @property
    def annotated_sweeps(self) -> tuple[int, ...]:
        """0-based indices of the sweeps with at least one annotated frame."""
        return tuple(sorted({run.start // self.frames_per_sweep for run in self.runs}))

    def labels(self) -> np.ndarray:
        """Per-frame label (0, 1, 2) as drawn in the mask."""
        out = np.zeros(SWEEPS_PER_CASE * self.frames_per_sweep, dtype=np.uint8)
        for run in self.runs:
            out[run.start:run.stop] = run.label
        return out


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case `index` of a dataset: the same whatever the number of cases."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def _lognormal_length(rng: np.random.Generator, spec: tuple[float, float, int], scale: float) -> int:
    median, sigma, longest = spec
    frames = min(float(longest), max(1.0, median * math.exp(sigma * rng.standard_normal())))
    return max(1, int(round(frames * scale)))


def _choose_sweeps(rng: np.random.Generator, cfg: ReplicaConfig, optimal: bool) -> list[int]:
    probs = np.asarray(cfg.sweeps_if_optimal if optimal else cfg.sweeps_if_suboptimal_only, dtype=float)
    count = int(rng.choice(len(probs), p=probs / probs.sum()))
    weights = np.asarray(cfg.sweep_weights, dtype=float)
    return sorted(int(s) for s in rng.choice(SWEEPS_PER_CASE, size=count, replace=False, p=weights / weights.sum()))


def _block_patterns(rng: np.random.Generator, cfg: ReplicaConfig, sweeps: list[int], optimal: bool) -> list[str]:
    """Run pattern of each annotated sweep: 'S', or one of the optimal patterns ('O', 'SO', 'OS', 'SOS')."""
    with_optimal = np.zeros(len(sweeps), dtype=bool)
    if optimal and sweeps:
        with_optimal[rng.integers(len(sweeps))] = True
        with_optimal |= rng.random(len(sweeps)) < cfg.p_extra_optimal_sweep
    names = [p for p, _ in cfg.optimal_patterns]
    weights = np.asarray([w for _, w in cfg.optimal_patterns], dtype=float)
    return [str(rng.choice(names, p=weights / weights.sum())) if o else "S" for o in with_optimal]


def _sweep_runs(rng: np.random.Generator, cfg: ReplicaConfig, sweep: int, pattern: str) -> list[Run]:
    """Runs of one sweep: lengths from the real distributions, one contiguous block placed in the sweep."""
    k = cfg.frames_per_sweep
    lengths = [_lognormal_length(rng, cfg.optimal_run if c == "O" else cfg.suboptimal_run, cfg.time_scale)
               for c in pattern]
    room = k - 2  # keep one frame on each side for a faint end frame
    while sum(lengths) > room:  # only with tiny sweeps: shorten the longest run
        longest = int(np.argmax(lengths))
        if lengths[longest] == 1:
            lengths.pop(longest)
            pattern = pattern[:longest] + pattern[longest + 1:]
        else:
            lengths[longest] -= 1
    total = sum(lengths)
    mean, sd = cfg.block_start
    start = int(round((mean + sd * rng.standard_normal()) * k))
    start = int(np.clip(start, 1, k - 1 - total))
    runs, frame = [], sweep * k + start
    for c, n in zip(pattern, lengths):
        runs.append(Run(frame, frame + n, LABEL_OPTIMAL if c == "O" else LABEL_SUBOPTIMAL))
        frame += n
    return runs


def _semi_axes(perimeter_px: float, aspect: float) -> tuple[float, float]:
    """Semi-axes (a, b = aspect a) of the ellipse with this Ramanujan perimeter."""
    q = aspect
    unit = math.pi * (3.0 * (1.0 + q) - math.sqrt((3.0 + q) * (1.0 + 3.0 * q)))
    a = perimeter_px / unit
    return a, a * q


def _inside_fraction(ellipse: EllipseView, geometry: SectorGeometry, margin: float = 0.0) -> float:
    pts = ellipse.points(96)
    return float(geometry.contains(pts[:, 0], pts[:, 1], margin).mean())


def _place_ellipse(rng: np.random.Generator, geometry: SectorGeometry, semi_axes: tuple[float, float],
                   angle: float, cut: bool, tries: int = 400) -> tuple[float, float]:
    """A centre for the ellipse: wholly inside the sector, or (cut) partly outside it, centre inside."""
    best, best_score = (geometry.apex_x, 0.55 * geometry.height), -1.0
    for _ in range(tries):
        cx = rng.uniform(0.1, 0.9) * geometry.width
        cy = rng.uniform(0.15, 0.85) * geometry.height
        if not geometry.contains(np.array([cx]), np.array([cy]), margin=20.0)[0]:
            continue
        inside = _inside_fraction(EllipseView((cx, cy), semi_axes, angle), geometry, margin=6.0)
        score = -abs(inside - 0.8) if cut else inside
        if cut and 0.65 <= inside <= 0.92 or not cut and inside == 1.0:
            return cx, cy
        if score > best_score:
            best, best_score = (cx, cy), score
    return best


def _abdomen_views(rng: np.random.Generator, cfg: ReplicaConfig, runs: list[Run], ac_mm: float
                   ) -> dict[int, AbdomenView]:
    """Per-frame abdomen of one sweep's block: it grows then shrinks around the best frame and drifts."""
    geometry = cfg.geometry
    first, last = runs[0].start, runs[-1].stop - 1
    optimal = [r for r in runs if r.label == LABEL_OPTIMAL]
    peak = (optimal[0].start + optimal[0].stop - 1) / 2.0 if optimal else (first + last) / 2.0
    frames = list(range(first, last + 1))
    sweep_lo = (first // cfg.frames_per_sweep) * cfg.frames_per_sweep
    for end, step in ((first, -1), (last, +1)):
        neighbour = end + step
        if sweep_lo <= neighbour < sweep_lo + cfg.frames_per_sweep and rng.random() < cfg.p_faint_end:
            frames.append(neighbour)
    reach = max(peak - (first - 1), (last + 1) - peak, 1.0)

    perimeter = ac_mm / cfg.spacing_mm
    q_opt = rng.uniform(*cfg.optimal_aspect)
    q_sub = rng.uniform(*cfg.suboptimal_aspect)
    # Oblique cuts next to an optimal plane are a little larger than it; in a sweep without an optimal
    # plane the best suboptimal frame is the measured one, so it is drawn at the sweep's AC.
    oversize = rng.uniform(*cfg.suboptimal_oversize) if optimal else 1.0
    angle0 = rng.uniform(0.0, 180.0)
    label_of = {f: r.label for r in runs for f in range(r.start, r.stop)}
    biggest = _semi_axes(perimeter * max(1.0, oversize), min(q_opt, q_sub))
    cut = rng.random() < cfg.p_cut_by_fov
    center = _place_ellipse(rng, geometry, biggest, angle0, cut)
    drift = rng.normal(0.0, cfg.drift_px_per_frame / cfg.time_scale, size=2) * np.array([1.0, 0.6])
    spin = rng.normal(0.0, cfg.spin_deg_per_frame / cfg.time_scale)
    spine_deg = rng.uniform(0.0, 360.0)
    stomach_side = 1 if rng.random() < 0.5 else -1
    oblique_spine = bool(rng.random() < 0.5)
    ribs = int(rng.integers(0, 3))
    wall = np.where(rng.random(WALL_ARCS) < 0.2, 0.1, rng.uniform(0.2, 1.0, size=WALL_ARCS))

    views = {}
    for f in sorted(frames):
        label = label_of.get(f, 0)
        u = (f - peak) / reach
        size = 1.0 - cfg.size_falloff * u * u
        if label == LABEL_OPTIMAL:
            axes = _semi_axes(perimeter * size, q_opt)
        else:
            axes = _semi_axes(perimeter * size * oversize, q_sub)
        dt = f - peak
        jitter = rng.normal(0.0, 0.6, size=2)
        c = (center[0] + drift[0] * dt + jitter[0], center[1] + drift[1] * dt + jitter[1])
        ellipse = EllipseView((float(c[0]), float(c[1])), (float(axes[0]), float(axes[1])),
                              float((angle0 + spin * dt) % 180.0))
        views[f] = AbdomenView(ellipse, label, 1.0 if label else cfg.faint_visibility,
                               float(spine_deg + 0.3 * dt), stomach_side, oblique_spine, ribs,
                               tuple(float(x) for x in np.roll(wall, int(dt) // 4)))
    return views


def _free_spans(busy: np.ndarray, lo: int, hi: int, length: int) -> list[int]:
    """Starts s in [lo, hi - length] such that frames s .. s + length - 1 are all free."""
    return [s for s in range(lo, hi - length + 1) if not busy[s:s + length].any()]


def _head_views(rng: np.random.Generator, cfg: ReplicaConfig, busy: np.ndarray, ac_mm: float
                ) -> dict[int, HeadView]:
    """A fetal head (bright skull ring) passing through a few frames of one sweep, away from the abdomen."""
    k = cfg.frames_per_sweep
    length = max(1, int(round(rng.integers(cfg.head_frames[0], cfg.head_frames[1] + 1) * cfg.time_scale)))
    sweep = int(rng.integers(SWEEPS_PER_CASE))
    starts = _free_spans(busy, sweep * k, (sweep + 1) * k, length)
    if not starts:
        return {}
    start = int(rng.choice(starts))
    axes = _semi_axes(ac_mm * rng.uniform(0.85, 1.05) / cfg.spacing_mm, rng.uniform(0.74, 0.86))
    angle = rng.uniform(0.0, 180.0)
    center = _place_ellipse(rng, cfg.geometry, axes, angle, cut=rng.random() < 0.4)
    drift = rng.normal(0.0, cfg.drift_px_per_frame / cfg.time_scale, size=2)
    mid = start + (length - 1) / 2.0
    views = {}
    for f in range(start, start + length):
        u = (f - mid) / (length / 2.0 + 1.0)
        size = 1.0 - 0.35 * u * u
        dt = f - mid
        views[f] = HeadView(EllipseView((center[0] + drift[0] * dt, center[1] + drift[1] * dt),
                                        (axes[0] * size, axes[1] * size), angle),
                            float(min(1.0, 1.6 * (1.0 - abs(u)))))
    busy[start:start + length] = True
    return views


def _bone_views(rng: np.random.Generator, cfg: ReplicaConfig, busy: np.ndarray, sweep: int
                ) -> dict[int, BoneView]:
    """A femur-like bright line seen for a few frames."""
    k = cfg.frames_per_sweep
    length = max(1, int(round(rng.integers(cfg.bone_frames[0], cfg.bone_frames[1] + 1) * cfg.time_scale)))
    starts = _free_spans(busy, sweep * k, (sweep + 1) * k, length)
    if not starts:
        return {}
    start = int(rng.choice(starts))
    geometry = cfg.geometry
    for _ in range(50):
        cx, cy = rng.uniform(0.2, 0.8) * geometry.width, rng.uniform(0.15, 0.85) * geometry.height
        if geometry.contains(np.array([cx]), np.array([cy]), margin=40.0)[0]:
            break
    half = rng.uniform(35.0, 95.0)
    angle = rng.uniform(-0.6, 0.6) + (0.0 if rng.random() < 0.7 else math.pi / 2)
    thickness = rng.uniform(5.0, 8.0)
    drift = rng.normal(0.0, 1.5 / cfg.time_scale, size=2)
    views = {}
    mid = start + (length - 1) / 2.0
    for f in range(start, start + length):
        dt = f - mid
        c = (cx + drift[0] * dt, cy + drift[1] * dt)
        d = (half * math.cos(angle), half * math.sin(angle))
        vis = float(min(1.0, 1.5 * (1.0 - abs(dt) / (length / 2.0 + 1.0))))
        views[f] = BoneView((c[0] - d[0], c[1] - d[1]), (c[0] + d[0], c[1] + d[1]), thickness, vis)
    return views


def _liftoff_gains(rng: np.random.Generator, cfg: ReplicaConfig, busy: np.ndarray) -> dict[int, float]:
    """Sweep ends where the probe is off the skin: black frames, then one or two frames fading in."""
    k = cfg.frames_per_sweep
    gains: dict[int, float] = {}
    for sweep in range(SWEEPS_PER_CASE):
        lo, hi = sweep * k, (sweep + 1) * k
        for at_start in (True, False):
            if rng.random() >= cfg.p_liftoff_per_end:
                continue
            black = max(1, int(round(rng.integers(cfg.liftoff_frames[0], cfg.liftoff_frames[1] + 1)
                                     * cfg.time_scale)))
            ramp = [0.0] * black + [0.3, 0.65][: 1 + int(rng.integers(2))]
            frames = range(lo, lo + len(ramp)) if at_start else range(hi - 1, hi - 1 - len(ramp), -1)
            for f, g in zip(frames, ramp):
                if busy[f]:
                    break
                gains[f] = g
    return gains


def plan_case(rng: np.random.Generator | int, cfg: ReplicaConfig | None = None, abdomen: bool = True
              ) -> CasePlan:
    """Draw what a case contains: uuid, annotated runs, the abdomen per frame, distractors, lift-off."""
    cfg = cfg or ReplicaConfig()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    pair = bool(rng.random() < cfg.p_pair_with_previous)
    case_uuid = str(uuidlib.UUID(bytes=rng.bytes(16), version=4))
    case_ac = float(np.clip(rng.normal(*cfg.ac_mm), *cfg.ac_range_mm))
    optimal = bool(rng.random() < cfg.p_case_optimal)
    sweeps = _choose_sweeps(rng, cfg, optimal) if abdomen else []
    patterns = _block_patterns(rng, cfg, sweeps, optimal)

    runs: list[Run] = []
    views: dict[int, AbdomenView] = {}
    target: list[float | None] = [None] * SWEEPS_PER_CASE
    for sweep, pattern in zip(sweeps, patterns):
        sweep_runs = _sweep_runs(rng, cfg, sweep, pattern)
        ac = float(np.clip(case_ac * (1.0 + cfg.ac_sweep_jitter * rng.standard_normal()), *cfg.ac_range_mm))
        target[sweep] = ac
        runs.extend(sweep_runs)
        views.update(_abdomen_views(rng, cfg, sweep_runs, ac))

    # Frames near the abdomen stay free of other fetal parts and of lift-off.
    busy = np.zeros(cfg.frames, dtype=bool)
    for f in views:
        busy[max(0, f - 2):f + 3] = True
    heads = _head_views(rng, cfg, busy, case_ac) if rng.random() < cfg.p_head else {}
    bones: dict[int, tuple[BoneView, ...]] = {}
    for sweep in range(SWEEPS_PER_CASE):
        if rng.random() < cfg.p_bone_per_sweep:
            for f, bone in _bone_views(rng, cfg, busy, sweep).items():
                bones[f] = bones.get(f, ()) + (bone,)
    for f in views:
        busy[f] = True
    gains = _liftoff_gains(rng, cfg, busy)
    return CasePlan(case_uuid, pair, cfg.frames_per_sweep, tuple(sorted(runs, key=lambda r: r.start)),
                    tuple(target), views, heads, bones, gains)


# ---------------------------------------------------------------------------------------------- render

def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Canvas:
    """Half-resolution drawing surface of one case: its grid, beam geometry and reusable layers."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.geometry = cfg.geometry
        self.shape = ((cfg.height + 1) // 2, (cfg.width + 1) // 2)
        h, w = self.shape
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        # Half-res pixel j covers full-res pixels 2j, 2j+1 (cv2.resize's convention when upsampling x2).
        self.r, self.theta = self.geometry.polar(2.0 * x + 0.5, 2.0 * y + 0.5)
        self.r = self.r.astype(np.float32)
        self.theta = self.theta.astype(np.float32)
        g = self.geometry
        self.depth_rows = int(math.ceil((g.r_outer - g.r_inner) / 2.0)) + 2
        self.beam_step = 2.0 * g.half_angle_deg / cfg.speckle_beams
        self.map_x = ((self.theta + g.half_angle_deg) / self.beam_step + 2.0).astype(np.float32)
        self.map_y = ((self.r - g.r_inner) / 2.0).astype(np.float32)
        self.fov = (sector_fov(cfg.height, cfg.width) * 255).astype(np.uint8)
        mix = 0.4 + 0.85 * np.exp(-(self.r - g.r_inner) / cfg.speckle_near_depth)
        self.mix_beam, self.mix_grain = np.cos(mix).astype(np.float32), np.sin(mix).astype(np.float32)
        self.lateral = (1.0 - 0.6 * (self.theta / g.half_angle_deg) ** 4).astype(np.float32)

    def layer(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=np.float32)

    @staticmethod
    def half(v: float) -> float:
        """Full-resolution coordinate -> half-resolution coordinate."""
        return (v - 0.5) / 2.0


_SHIFT = 3  # sub-pixel bits for cv2 drawing


def _fx(v: float) -> int:
    return int(round(v * (1 << _SHIFT)))


def _draw_ellipse(layer: np.ndarray, e: EllipseView, value: float, thickness: int = -1,
                  scale: float = 1.0, arc: tuple[float, float] = (0.0, 360.0)) -> None:
    """Draw (half-res) an ellipse given in full-res coordinates; filled when thickness is -1."""
    c = (_fx(_Canvas.half(e.center[0])), _fx(_Canvas.half(e.center[1])))
    axes = (_fx(max(0.5, scale * e.semi_axes[0] / 2.0)), _fx(max(0.5, scale * e.semi_axes[1] / 2.0)))
    cv2.ellipse(layer, c, axes, e.angle_deg, arc[0], arc[1], float(value), thickness, cv2.LINE_8, _SHIFT)


def _draw_segment(layer: np.ndarray, p0: Sequence[float], p1: Sequence[float], value: float,
                  thickness: float) -> None:
    a = (_fx(_Canvas.half(p0[0])), _fx(_Canvas.half(p0[1])))
    b = (_fx(_Canvas.half(p1[0])), _fx(_Canvas.half(p1[1])))
    cv2.line(layer, a, b, float(value), max(1, int(round(thickness / 2.0))), cv2.LINE_8, _SHIFT)


def _draw_disc(layer: np.ndarray, p: Sequence[float], radius: float, value: float) -> None:
    c = (_fx(_Canvas.half(p[0])), _fx(_Canvas.half(p[1])))
    cv2.circle(layer, c, _fx(max(0.5, radius / 2.0)), float(value), -1, cv2.LINE_8, _SHIFT)


def _shadow_polygon(layer: np.ndarray, geometry: SectorGeometry, p0: np.ndarray, p1: np.ndarray,
                    length: float, value: float) -> None:
    """Acoustic shadow behind the segment p0-p1: a band running away from the probe along the beams."""
    q0 = p0 + length * geometry.beam_direction(*p0)
    q1 = p1 + length * geometry.beam_direction(*p1)
    poly = np.array([p0, p1, q1, q0], dtype=np.float64)
    poly = np.round(((poly - 0.5) / 2.0) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillConvexPoly(layer, poly, float(value), cv2.LINE_8, _SHIFT)


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(layer, (0, 0), sigma)


class _SweepBackground:
    """What stays put or changes slowly along one sweep: gain profile, tissue texture, fluid, speckle."""

    def __init__(self, rng: np.random.Generator, canvas: _Canvas):
        self.rng, self.canvas, cfg = rng, canvas, canvas.cfg
        g = canvas.geometry
        self.gain = self._gain_map(rng, canvas) * cfg.brightness
        keys = cfg.frames_per_sweep // cfg.field_step_frames + 3
        # Two slowly changing low-resolution fields: tissue echogenicity and amniotic fluid.
        low = rng.standard_normal((2, keys, 24, 32)).astype(np.float32)
        low = ndimage.gaussian_filter(low, sigma=(0, 0.8, 1.6, 1.6), mode="wrap")
        low /= low.std(axis=(1, 2, 3), keepdims=True) + 1e-6
        self.low = low
        self.fluid_threshold = float(rng.uniform(0.3, 1.0))
        depth = (canvas.r - g.r_inner) / (g.r_outer - g.r_inner)
        self.fluid_prior = (_smoothstep(depth, 0.12, 0.35) * (1.0 - 0.4 * _smoothstep(depth, 0.8, 1.0))
                            ).astype(np.float32)
        # Mid-scale tissue texture, drifting with the probe: cut from a larger field, so it never wraps.
        self.texture_drift = np.clip(rng.normal(0.0, 0.3, size=2), -0.5, 0.5) / cfg.time_scale
        self.margin = int(math.ceil(0.5 * REAL_FRAMES_PER_SWEEP)) + 1
        h, w = canvas.shape
        mid = _blur(rng.standard_normal((h + 2 * self.margin, w + 2 * self.margin)).astype(np.float32), 2.5)
        self.texture = mid / (mid.std() + 1e-6)
        self.speckle = _SpeckleStream(rng, canvas)

    @staticmethod
    def _gain_map(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
        """Depth profile (attenuation, bright near-field layers, far-field fade) x lateral fall-off."""
        cfg, g = canvas.cfg, canvas.geometry
        d = np.arange(int(g.r_outer - g.r_inner) + 4, dtype=np.float64)  # depth below the skin, px
        alpha = rng.uniform(*cfg.attenuation_per_px)
        profile = np.exp(-alpha * (d - 200.0)) * (1.0 + 0.3 * np.exp(-d / 60.0))
        for _ in range(int(rng.integers(5, 11))):  # skin, fat and muscle layers of the mother
            at, width, amp = rng.uniform(2.0, 110.0), rng.uniform(1.5, 4.0), rng.uniform(0.3, 1.0)
            profile += amp * np.exp(-0.5 * ((d - at) / width) ** 2) * math.exp(-alpha * at)
        profile *= 1.0 - 0.85 * _smoothstep(d, d[-1] - 70.0, d[-1])
        profile *= rng.uniform(0.8, 1.2)
        depth = np.clip(canvas.r - g.r_inner, 0, len(d) - 1).astype(np.int32)
        return (profile.astype(np.float32)[depth] * canvas.lateral).astype(np.float32)

    def echogenicity(self, t: int) -> np.ndarray:
        """Tissue echogenicity of frame t of the sweep (mean about 1), with fluid pockets near 0."""
        cfg, canvas = self.canvas.cfg, self.canvas
        pos = t / cfg.field_step_frames
        i, w = int(pos), pos - int(pos)
        low = (1.0 - w) * self.low[:, i] + w * self.low[:, i + 1]
        h, wd = canvas.shape
        tissue = cv2.resize(low[0], (wd, h), interpolation=cv2.INTER_CUBIC)
        fluid = cv2.resize(low[1], (wd, h), interpolation=cv2.INTER_CUBIC)
        dx, dy = (self.margin + np.round(self.texture_drift * t)).astype(int)
        texture = self.texture[dy:dy + h, dx:dx + wd]
        echo = np.exp(0.4 * tissue - 0.08) * (1.0 + 0.22 * texture)
        wet = _smoothstep(fluid, self.fluid_threshold - 0.25, self.fluid_threshold + 0.25) * self.fluid_prior
        return (echo * (1.0 - 0.93 * wet)).astype(np.float32)


class _SpeckleStream:
    """Rayleigh speckle of one sweep, cross-faded between independent fields along the sweep.

    The complex echo field is the mix of two correlated complex Gaussian fields: one on the beam grid
    (long along the beam: the radial streaks of a convex probe's far field) and one isotropic fine grain
    (dominant in the near field). A mix cos(w) A + sin(w) B of independent unit fields is again one, so
    neither the depth mix nor the fade between frames flattens the speckle: |Z| stays Rayleigh.
    """

    def __init__(self, rng: np.random.Generator, canvas: _Canvas):
        self.rng, self.canvas = rng, canvas
        self.fields: dict[int, tuple[np.ndarray, ...]] = {}

    def _unit(self, shape: tuple[int, int], sigma_xy: tuple[float, float]) -> np.ndarray:
        """Correlated zero-mean unit-variance noise.

        Blurred uniform random bytes: the blur averages enough samples to make them Gaussian for all that
        matters here (the magnitude's percentiles match Rayleigh's within a few %), at a tenth of the cost
        of drawing normals, which otherwise dominate the generator's run time.
        """
        z = np.frombuffer(self.rng.bytes(shape[0] * shape[1]), dtype=np.uint8).reshape(shape).astype(np.float32)
        z = cv2.GaussianBlur(z, (0, 0), sigmaX=sigma_xy[0], sigmaY=sigma_xy[1])
        mean, std = cv2.meanStdDev(z)
        z -= np.float32(mean[0, 0])
        z *= np.float32(1.0 / (std[0, 0] + 1e-6))
        return z

    def _field(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(re, im) of key field j on the half-res grid: beam-grid streaks and grain, mixed by depth.

        Everything up to the magnitude is linear, so it is done once per key field, not once per frame.
        """
        if j not in self.fields:
            canvas, cfg = self.canvas, self.canvas.cfg
            beam_shape = (canvas.depth_rows, cfg.speckle_beams + 4)
            beam_sigma = (cfg.speckle_beam_sigma[1], cfg.speckle_beam_sigma[0])
            grain_sigma = (cfg.speckle_grain_sigma, cfg.speckle_grain_sigma)
            parts = []
            for _ in range(2):
                beam = cv2.remap(self._unit(beam_shape, beam_sigma), canvas.map_x, canvas.map_y,
                                 cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                parts.append(canvas.mix_beam * beam + canvas.mix_grain * self._unit(canvas.shape, grain_sigma))
            self.fields = {k: v for k, v in self.fields.items() if k >= j - 1}
            self.fields[j] = (parts[0], parts[1])
        return self.fields[j]

    def amplitude(self, t: int) -> np.ndarray:
        """Half-res speckle amplitude of frame t (mean 1)."""
        cfg = self.canvas.cfg
        pos = t / cfg.speckle_frames
        j, w = int(pos), (pos - int(pos)) * math.pi / 2.0
        (a_re, a_im), (b_re, b_im) = self._field(j), self._field(j + 1)
        re = cv2.addWeighted(a_re, math.cos(w), b_re, math.sin(w), 0.0)
        im = cv2.addWeighted(a_im, math.cos(w), b_im, math.sin(w), 0.0)
        gamma = cfg.speckle_contrast
        # |Z| of unit-variance parts is Rayleigh(1): E|Z|^g = 2^(g/2) Gamma(1 + g/2); divide it out.
        amplitude = cv2.pow(cv2.magnitude(re, im), gamma) * (1.0 / (2.0 ** (gamma / 2) * math.gamma(1 + gamma / 2)))
        # The scanner's spatial smoothing: fills the isolated black holes of raw speckle.
        return cv2.GaussianBlur(amplitude, (0, 0), cfg.speckle_smoothing)


def _draw_abdomen(echo: np.ndarray, shadow: np.ndarray, view: AbdomenView, canvas: _Canvas,
                  style: CaseStyle) -> None:
    """Abdomen of one frame into the echogenicity map (in place); acoustic shadows into `shadow`."""
    e, g, v = view.ellipse, canvas.geometry, view.visibility
    a, b = e.semi_axes
    wall = max(8.0, 0.07 * a)  # full-res px

    # Fluid around part of the abdomen, then the abdomen's own (liver) echogenicity inside.
    halo = canvas.layer()
    _draw_ellipse(halo, e, 1.0, scale=1.0 + style.halo)
    inside = canvas.layer()
    _draw_ellipse(inside, e, 1.0)
    halo = _blur(halo - inside, 3.0) * style.halo_depth * v
    inside = _blur(inside, 1.0)
    echo *= 1.0 - halo
    interior = style.interior * (0.8 + 0.2 * echo)  # tissue echogenicity averages 1
    echo[:] = echo * (1.0 - v * inside) + v * inside * interior

    # The wall: bright where the beam meets it head-on (specular), faint or missing at the sides.
    rim = canvas.layer()
    n_arcs = len(view.wall)
    for k in range(n_arcs):
        phi = math.radians((k + 0.5) * 360.0 / n_arcs)
        p = e.local_to_image(a * math.cos(phi), b * math.sin(phi))
        normal = e.local_to_image(b * math.cos(phi), a * math.sin(phi)) - np.asarray(e.center)
        normal /= max(float(np.hypot(*normal)), 1e-6)
        spec = abs(float(normal @ g.beam_direction(*p)))
        level = style.wall * (0.25 + 0.75 * spec ** 2) * view.wall[k]
        thick = max(1, int(round(wall / 2.0)))
        _draw_ellipse(rim, e, level, thickness=thick, scale=1.0 - 0.5 * wall / a,
                      arc=(k * 360.0 / n_arcs, (k + 1) * 360.0 / n_arcs + 1.0))

    if view.label == LABEL_OPTIMAL:
        _draw_landmarks(echo, rim, shadow, view, canvas, style)
    elif view.label == LABEL_SUBOPTIMAL:
        _draw_oblique_features(rim, shadow, view, canvas, style)
    echo += _blur(rim, 1.5) * v


def _spine_point(view: AbdomenView, depth: float) -> np.ndarray:
    e = view.ellipse
    phi = math.radians(view.spine_deg)
    return e.local_to_image(depth * e.semi_axes[0] * math.cos(phi), depth * e.semi_axes[1] * math.sin(phi))


@dataclass(frozen=True)
class Landmarks:
    """Where the optimal-plane landmarks of an abdomen view are drawn (full-res px)."""

    stomach: EllipseView
    spine: tuple[tuple[float, float], ...]  # centres of the three ossification centres
    spine_radius: float
    vein: tuple[tuple[float, float], tuple[float, float]]  # umbilical vein segment


def landmarks(view: AbdomenView) -> Landmarks:
    """Stomach on one side of the spine-navel axis, spine just inside the wall, vein from the front wall."""
    e = view.ellipse
    a, b = e.semi_axes
    phi = math.radians(view.spine_deg)
    side = phi + view.stomach_side * math.pi / 2.0
    stomach_c = e.local_to_image(0.42 * a * math.cos(side), 0.42 * b * math.sin(side))
    stomach = EllipseView((float(stomach_c[0]), float(stomach_c[1])), (0.24 * a, 0.16 * a),
                          (e.angle_deg + math.degrees(side) + 90.0) % 180.0)
    body = _spine_point(view, 0.78)
    radial = _spine_point(view, 1.0) - body
    radial /= max(float(np.hypot(*radial)), 1e-6)
    tangent = np.array([-radial[1], radial[0]])
    r = max(4.0, 0.055 * a)
    spine = (body, body + radial * 2.6 * r + tangent * 1.6 * r, body + radial * 2.6 * r - tangent * 1.6 * r)
    front = phi + math.pi + 0.25 * view.stomach_side
    back = front - 0.3 * view.stomach_side
    p0 = e.local_to_image(0.9 * a * math.cos(front), 0.9 * b * math.sin(front))
    p1 = e.local_to_image(0.45 * a * math.cos(back), 0.45 * b * math.sin(back))
    as_tuple = lambda p: (float(p[0]), float(p[1]))  # noqa: E731
    return Landmarks(stomach, tuple(as_tuple(p) for p in spine), r, (as_tuple(p0), as_tuple(p1)))


def _draw_landmarks(echo: np.ndarray, rim: np.ndarray, shadow: np.ndarray, view: AbdomenView,
                    canvas: _Canvas, style: CaseStyle) -> None:
    """Optimal plane: stomach bubble (dark), spine (three bright ossification centres), umbilical vein."""
    marks, g = landmarks(view), canvas.geometry
    a = view.ellipse.semi_axes[0]
    bubble = canvas.layer()
    _draw_ellipse(bubble, marks.stomach, 1.0)
    echo *= 1.0 - 0.92 * _blur(bubble, 1.5)
    _draw_ellipse(rim, marks.stomach, 0.5 * style.wall, thickness=1)  # its wall, posterior echo

    centres = [np.asarray(p) for p in marks.spine]
    for p, size in zip(centres, (1.2, 0.9, 0.9)):
        _draw_disc(rim, p, marks.spine_radius * size, style.bone)
    far = max(centres, key=lambda p: float(np.hypot(p[0] - g.apex_x, p[1] - g.apex_y)))
    radial = g.beam_direction(*far)
    across = np.array([-radial[1], radial[0]]) * 2.2 * marks.spine_radius
    _shadow_polygon(shadow, g, far - across, far + across, 0.9 * a, 0.6)

    _draw_segment(rim, marks.vein[0], marks.vein[1], 0.75 * style.bone, max(5.0, 0.04 * a))


def _draw_oblique_features(rim: np.ndarray, shadow: np.ndarray, view: AbdomenView, canvas: _Canvas,
                           style: CaseStyle) -> None:
    """Oblique cut: no stomach, no umbilical vein; maybe a streak of spine, rib echoes on the wall."""
    e, g = view.ellipse, canvas.geometry
    a, b = e.semi_axes
    if view.spine_in_oblique:
        p0, p1 = _spine_point(view, 0.7), _spine_point(view, 0.95)
        tangent = np.array([p1[1] - p0[1], p0[0] - p1[0]])
        tangent *= 0.25 * a / max(float(np.hypot(*tangent)), 1e-6)
        _draw_segment(rim, p0 - tangent, p1 + tangent, 0.6 * style.bone, max(4.0, 0.03 * a))
    for k in range(view.ribs):
        phi = math.radians(view.spine_deg + 60.0 + 70.0 * k)
        p = e.local_to_image(0.97 * a * math.cos(phi), 0.97 * b * math.sin(phi))
        t = e.local_to_image(-a * math.sin(phi), b * math.cos(phi)) - np.asarray(e.center)
        t *= 0.08 * a / max(float(np.hypot(*t)), 1e-6)
        _draw_segment(rim, p - t, p + t, 0.8 * style.bone, 5.0)
        _shadow_polygon(shadow, g, p - t, p + t, 0.6 * a, 0.45)


def _draw_head(echo: np.ndarray, shadow: np.ndarray, view: HeadView, canvas: _Canvas,
               style: CaseStyle) -> None:
    """Fetal head: thick, bright skull ring, dark brain with a midline echo, shadowed far field."""
    e, v = view.ellipse, view.visibility
    a, b = e.semi_axes
    brain = canvas.layer()
    _draw_ellipse(brain, e, 1.0)
    brain = _blur(brain, 1.5)
    echo *= 1.0 - v * 0.7 * brain
    bright = canvas.layer()
    skull = max(6.0, 0.07 * a)
    _draw_ellipse(bright, e, style.bone, thickness=max(1, int(round(skull / 2.0))),
                  scale=1.0 - 0.5 * skull / a)
    _draw_segment(bright, e.local_to_image(-0.8 * a, 0.0), e.local_to_image(0.8 * a, 0.0),
                  0.45 * style.bone, 3.0)
    echo += _blur(bright, 1.2) * v
    far = e.points(2 * 18)
    g = canvas.geometry
    dist = np.hypot(far[:, 0] - g.apex_x, far[:, 1] - g.apex_y)
    back = far[np.argsort(dist)[-12:]]
    left, right = back[np.argmin(back @ np.array([1.0, 0.0]))], back[np.argmax(back @ np.array([1.0, 0.0]))]
    _shadow_polygon(shadow, g, left, right, 0.8 * a, 0.35 * v)


def _draw_bone(echo: np.ndarray, shadow: np.ndarray, view: BoneView, canvas: _Canvas,
               style: CaseStyle) -> None:
    layer = canvas.layer()
    _draw_segment(layer, view.p0, view.p1, style.bone, view.thickness)
    echo += _blur(layer, 1.0) * view.visibility
    _shadow_polygon(shadow, canvas.geometry, np.asarray(view.p0), np.asarray(view.p1), 180.0,
                    0.6 * view.visibility)


@dataclass(frozen=True)
class CaseStyle:
    """Per-case contrast of the anatomy (fetuses and machines differ), relative to average tissue."""

    interior: float  # abdomen content
    wall: float  # abdominal wall
    bone: float  # spine, skull, femur
    halo: float  # width of the fluid rim around the abdomen, relative to its size
    halo_depth: float  # how dark that rim is

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "CaseStyle":
        return cls(interior=float(rng.uniform(0.35, 0.6)), wall=float(rng.uniform(2.5, 4.0)),
                   bone=float(rng.uniform(3.0, 4.5)), halo=float(rng.uniform(0.08, 0.3)),
                   halo_depth=float(rng.uniform(0.3, 0.8)))


def _liftoff_frame(canvas: _Canvas, background: _SweepBackground, t: int) -> np.ndarray:
    """Probe lifted off the skin: only faint reverberation of the near field; mean grey below 2."""
    g = canvas.geometry
    ring = np.exp(-(canvas.r - g.r_inner) / 25.0).astype(np.float32)
    return ring * background.speckle.amplitude(t) * 6.0


def _finish(frame_half: np.ndarray, canvas: _Canvas, out: np.ndarray) -> None:
    """Upsample a half-res float frame into a uint8 full-res slot, zero outside the sector."""
    full = cv2.resize(frame_half, (canvas.cfg.width, canvas.cfg.height), interpolation=cv2.INTER_LINEAR)
    cv2.bitwise_and(cv2.convertScaleAbs(full), canvas.fov, dst=out)


def render_case(plan: CasePlan, rng: np.random.Generator, cfg: ReplicaConfig | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) stacks of a plan, uint8 (frames, height, width)."""
    cfg = cfg or ReplicaConfig()
    if plan.frames_per_sweep != cfg.frames_per_sweep:
        raise ValueError(f"plan has {plan.frames_per_sweep} frames per sweep, config {cfg.frames_per_sweep}")
    canvas = _Canvas(cfg)
    style = CaseStyle.sample(rng)
    image = np.empty((cfg.frames, cfg.height, cfg.width), dtype=np.uint8)
    mask = np.zeros(image.shape, dtype=np.uint8)  # calloc: pages of unannotated frames are never touched
    fov = canvas.fov > 0
    labels = plan.labels()
    k = cfg.frames_per_sweep
    for sweep in range(SWEEPS_PER_CASE):
        background = _SweepBackground(rng, canvas)
        for t in range(k):
            f = sweep * k + t
            gain = plan.gain.get(f, 1.0)
            if gain == 0.0:
                frame = _liftoff_frame(canvas, background, t)
            else:
                echo = background.echogenicity(t)
                shadow = canvas.layer()
                if f in plan.abdomen:
                    _draw_abdomen(echo, shadow, plan.abdomen[f], canvas, style)
                if f in plan.heads:
                    _draw_head(echo, shadow, plan.heads[f], canvas, style)
                for bone in plan.bones.get(f, ()):
                    _draw_bone(echo, shadow, bone, canvas, style)
                if shadow.any():
                    echo *= 1.0 - _blur(shadow, 2.0)
                speckle = background.speckle.amplitude(t)
                frame = (echo * background.gain + cfg.noise_floor) * speckle * gain
                # The scanner's compression of strong echoes: grey levels above 200 stay rare.
                np.minimum(frame, cfg.knee_slope * frame + (1.0 - cfg.knee_slope) * cfg.knee, out=frame)
            _finish(frame, canvas, image[f])
            if labels[f]:
                _draw_mask(mask[f], plan.abdomen[f].ellipse, int(labels[f]), fov)
    return image, mask


def _draw_mask(out: np.ndarray, e: EllipseView, label: int, fov: np.ndarray) -> None:
    """The annotation: the abdomen ellipse filled with its label, restricted to the FOV (in place)."""
    out[e.draw_mask(out.shape) & fov] = label


# ------------------------------------------------------------------------------------------------ case

@dataclass(frozen=True)
class CaseArrays:
    """One generated case: stacks, the reference AC of each sweep (None = not annotated) and its plan."""

    uuid: str
    image: np.ndarray
    mask: np.ndarray
    ac_per_sweep: tuple[float | None, ...]
    measured_frames: tuple[int | None, ...]  # the frame each reference AC was measured on
    plan: CasePlan


def annotation_frame(plan: CasePlan, frame: int, cfg: ReplicaConfig, fov: np.ndarray | None = None
                     ) -> np.ndarray:
    """The (H, W) uint8 mask of one frame of a plan (all zeros on unannotated frames)."""
    out = np.zeros((cfg.height, cfg.width), dtype=np.uint8)
    label = int(plan.labels()[frame])
    if label:
        fov = sector_fov(cfg.height, cfg.width) if fov is None else fov
        _draw_mask(out, plan.abdomen[frame].ellipse, label, fov)
    return out


def reference_measurements(plan: CasePlan, cfg: ReplicaConfig, mask: np.ndarray | None = None
                           ) -> tuple[tuple[float | None, ...], tuple[int | None, ...]]:
    """Reference AC per sweep, measured like the annotators: on the sweep's best annotated frame.

    The best frame is the optimal frame with the largest mask (ties: the earliest); a sweep without an
    optimal frame is measured on its largest suboptimal one. The mask is fitted with the project's
    `circumference_mm` inside the sector, so an abdomen cut by the FOV edge is extrapolated. Without
    `mask` (the rendered stack) the needed frames are drawn from the plan, which gives the same masks.
    """
    fov = sector_fov(cfg.height, cfg.width)
    k = cfg.frames_per_sweep
    acs: list[float | None] = [None] * SWEEPS_PER_CASE
    frames: list[int | None] = [None] * SWEEPS_PER_CASE
    for sweep in plan.annotated_sweeps:
        runs = [r for r in plan.runs if r.start // k == sweep]
        label = LABEL_OPTIMAL if any(r.label == LABEL_OPTIMAL for r in runs) else LABEL_SUBOPTIMAL
        candidates = [f for r in runs if r.label == label for f in range(r.start, r.stop)]
        masks = [mask[f] if mask is not None else annotation_frame(plan, f, cfg, fov) for f in candidates]
        best = int(np.argmax([int(np.count_nonzero(m)) for m in masks]))
        ac = circumference_mm(masks[best], fov, cfg.spacing_mm)
        acs[sweep], frames[sweep] = (float(ac), candidates[best]) if ac > 0 else (None, None)
    return tuple(acs), tuple(frames)


def _with_frames(config: ReplicaConfig | None, frames_per_sweep: int | None) -> ReplicaConfig:
    cfg = config or ReplicaConfig()
    if frames_per_sweep is not None and frames_per_sweep != cfg.frames_per_sweep:
        cfg = dataclasses.replace(cfg, frames_per_sweep=frames_per_sweep)
    return cfg


def generate_case(rng_or_seed: np.random.Generator | int, frames_per_sweep: int | None = None,
                  config: ReplicaConfig | None = None, abdomen: bool = True) -> CaseArrays:
    """One replica case. `abdomen=False` gives a case without any abdomen (no annotation, no AC).

    `frames_per_sweep` (default: the config's, 140) overrides the config's when given.
    """
    cfg = _with_frames(config, frames_per_sweep)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    plan = plan_case(rng, cfg, abdomen=abdomen)
    image, mask = render_case(plan, rng, cfg)
    acs, frames = reference_measurements(plan, cfg, mask)
    return CaseArrays(plan.uuid, image, mask, acs, frames, plan)


# --------------------------------------------------------------------------------------------- dataset

def write_stack(array: np.ndarray, path: Path, cfg: ReplicaConfig, compression_level: int | None = None) -> None:
    """A (frames, H, W) uint8 stack as a compressed .mha with the release's spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((cfg.spacing_mm, cfg.spacing_mm, cfg.frame_spacing_mm))
    level = cfg.compression_level if compression_level is None else compression_level
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=level)


def _format_ac(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def subject_ids(pair_with_previous: Sequence[bool]) -> list[str]:
    """3-digit subject ids counting up from 000; a case paired with its predecessor shares its id.

    As in the release, a subject has at most two cases, so a pair flag right after a pair starts a new id.
    """
    ids: list[int] = []
    for i, paired in enumerate(pair_with_previous):
        joins = paired and i > 0 and (i < 2 or ids[-1] != ids[-2])
        ids.append(ids[-1] if joins else (ids[-1] + 1 if ids else 0))
    return [f"{s:03d}" for s in ids]


def write_dataset(out: Path | str, cases: int, frames_per_sweep: int | None = None, seed: int = 0,
                  config: ReplicaConfig | None = None, abdomen: bool = True, progress: bool = True
                  ) -> list[str]:
    """Write `cases` replica cases in the public release layout under `out`; returns their uuids.

    Case i depends only on (seed, i), so a bigger dataset starts with the cases of a smaller one.
    """
    out = Path(out)
    cfg = _with_frames(config, frames_per_sweep)
    uuids, pairs, acs = [], [], []
    for i in tqdm(range(cases), desc="replica cases", unit="case", disable=not progress):
        case = generate_case(case_rng(seed, i), config=cfg, abdomen=abdomen)
        write_stack(case.image, image_path(out, case.uuid), cfg)
        write_stack(case.mask, mask_path(out, case.uuid), cfg, cfg.mask_compression_level)
        uuids.append(case.uuid)
        pairs.append(case.plan.pair_with_previous)
        acs.append(case.ac_per_sweep)
    csv_path = out / CIRCUMFERENCES_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CIRCUMFERENCES_HEADER)
        for case_uuid, subject, ac in zip(uuids, subject_ids(pairs), acs):
            writer.writerow([case_uuid, subject] + [_format_ac(v) for v in ac])
    # Provenance, and the marker by which the data tools tell a replica from the real release.
    marker = {"generator": "training.data.replica", "seed": seed, "cases": cases, "abdomen": abdomen,
              "config": dataclasses.asdict(cfg)}
    (out / REPLICA_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return uuids


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training replica", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (release layout)")
    parser.add_argument("--cases", type=number(int, minimum=1), required=True, help="how many cases to write")
    parser.add_argument("--frames-per-sweep", type=number(int, minimum=MIN_FRAMES_PER_SWEEP),
                        default=REAL_FRAMES_PER_SWEEP, help="frames per sweep of each case (6 sweeps)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset's seed: same seed, same cases")
    parser.add_argument("--no-abdomen", action="store_true", help="cases without any abdomen or annotation")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    uuids = write_dataset(args.out, args.cases, args.frames_per_sweep, args.seed, abdomen=not args.no_abdomen)
    seconds = time.perf_counter() - started
    # The per-case time doubles as the generator's benchmark (its budget: docs/replica.md).
    print(f"wrote {len(uuids)} case{'s' * (len(uuids) != 1)} of {SWEEPS_PER_CASE * args.frames_per_sweep} frames to {args.out} "
          f"in {seconds:.1f} s ({seconds / len(uuids):.1f} s per case)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
