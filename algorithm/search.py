"""Which frames of a stack the network encodes and decodes: the frame search.

`FrameSearch` takes the network as an argument (MONAI's inferer pattern): it decides which frames go
through the encoder, in which batches, and which of them through the mask decoder; the network
(`network.py`) only runs what it is given. Any object with the network's `preprocess`, `encode`, `decode`
and `batch_size` can be searched.

* Lift-off frames (mean grey level below `liftoff_max_mean`: the probe off the belly) are never encoded.
* Frames are encoded in batches under `torch.inference_mode`; a background thread cuts and copies the next
  batch out of the stack (into pinned memory on CUDA) while the current one computes. Results reach the
  host when a decision needs them, never after every batch on CUDA.
* Lazy decoder (`lazy_decoder`, on by default): selection can only choose a frame whose smoothed
  P(abdomen) reaches `min_quality_probability`, and a smoothed value reaches it only if some frame of its
  smoothing window does. So the mask decoder runs only on frames with such a neighbour; the others keep a
  NaN mask fraction. The chosen frame is exactly the one a full decode gives. On the CPU the decision is
  taken after every batch (features of few frames held); on CUDA once, after every frame of the call is
  encoded (features held on the GPU, in the half type), so the GPU never waits for the host in between.
* Test-time flip (`tta` "flip", auto on CUDA): after the search, the frames the decoder ran on (the only
  ones that can be chosen) also run mirrored, and the two results are averaged (`augment`).
* Coarse-to-fine search (`coarse_stride` > 1, the CPU default for wide encoders): encode every k-th frame
  of each sweep, then encode the +-`refine_radius` neighbourhood of the best `refine_candidates` frames of
  every sweep, and repeat while the best frames move (a run of abdomen frames is followed to its best frame).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from .config import FRAME_OPTIMAL, FRAME_SUBOPTIMAL, InferenceConfig
from .preprocess import input_rows
from .progress import SearchProgress
from .runtime import StageTimer
from .select import evidence, frame_tiers, nan_moving_average, sweep_bounds

if TYPE_CHECKING:
    from .network import Network

# Refinement rounds of the coarse-to-fine search after the coarse pass (each follows the best frames of
# every sweep by up to `refine_radius` frames). Enough to walk along the longest annotated runs.
MAX_REFINE_ROUNDS = 4
# The coarse search refines only around frames whose smoothed P(abdomen) reaches this fraction of
# `min_quality_probability` (half of the selection threshold): sweeps without any sign of an abdomen cost
# only their coarse frames. A sweep whose best frame is below that cannot hold a frame that qualifies
# unless a whole run falls between two coarse frames with no echo in the frames around it.
REFINE_FLOOR = 0.5
# Slack on the decode rule, so that rounding in the moving average can never hide a qualifying frame.
_DECODE_SLACK = 1e-6

# Results of batches still on the device: frames and frame-head probabilities; frames, abdomen maps and
# mask fractions.
Encoded = list[tuple[np.ndarray, torch.Tensor]]
Decoded = list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]


@dataclass
class FrameScores:
    """Per-frame network outputs of one case; NaN for frames never run through the network.

    `probabilities` is set for every encoded frame, `mask_fractions` (and `abdomen_maps`) only for frames
    the decoder ran on: with the lazy decoder, frames that cannot be chosen are encoded but not decoded.
    """

    probabilities: np.ndarray  # (N, 3) frame-head softmax
    mask_fractions: np.ndarray  # (N,) share of the network input the mask covers
    abdomen_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (s, s) float16 probability

    @classmethod
    def empty(cls, n_frames: int) -> "FrameScores":
        return cls(np.full((n_frames, 3), np.nan), np.full(n_frames, np.nan))

    @property
    def scored(self) -> np.ndarray:
        """Frames run through the encoder (they have frame-head probabilities)."""
        return ~np.isnan(self.probabilities[:, 0])

    @property
    def decoded(self) -> np.ndarray:
        """Frames run through the mask decoder too."""
        return ~np.isnan(self.mask_fractions)


@dataclass
class Searched:
    """What a search found: the scores, how many frames it encoded (a frame encoded twice counts twice),
    and how it searched (result.json's `search`)."""

    scores: FrameScores
    frames_encoded: int
    details: dict


def resolve_coarse_stride(config: InferenceConfig, device: torch.device, encoder_width: int | None = None) -> int:
    """`coarse_stride` 0 (auto) -> 1 (dense) on CUDA; on the CPU `cpu_coarse_stride` for encoders at least
    `cpu_coarse_min_width` wide (ViT-L: seconds per frame), dense for narrower ones (the small
    configuration scans a whole case in about the time ViT-L needs for a stride-8 subsample, and a short
    run of abdomen frames can fall between two coarse frames)."""
    if config.coarse_stride > 0:
        return config.coarse_stride
    if device.type == "cuda" or (encoder_width is not None and encoder_width < config.cpu_coarse_min_width):
        return 1
    return max(1, config.cpu_coarse_stride)


def resolve_tta(config: InferenceConfig, device: torch.device) -> str:
    """`tta` auto -> "flip" on CUDA, "none" on the CPU; "none" and "flip" as given."""
    if config.tta == "auto":
        return "flip" if device.type == "cuda" else "none"
    if config.tta not in ("none", "flip"):
        raise ValueError(f"unknown test-time augmentation {config.tta!r}")
    return config.tta


def liftoff_frames(stack: np.ndarray, max_mean: float, chunk: int = 64) -> np.ndarray:
    """Frames so dark (probe lifted off the belly) that they cannot show an abdomen."""
    means = np.concatenate([stack[i:i + chunk].mean(axis=(1, 2)) for i in range(0, len(stack), chunk)]) \
        if len(stack) else np.zeros(0)
    return means < max_mean


def copy_probabilities(encoded: Encoded, scores: FrameScores) -> None:
    """Frame-head probabilities of the batches since the last call, copied to the host at once."""
    if not encoded:
        return
    frames = np.concatenate([e[0] for e in encoded])
    scores.probabilities[frames] = torch.cat([e[1] for e in encoded]).cpu().numpy()
    encoded.clear()


def copy_masks(decoded: Decoded, scores: FrameScores) -> None:
    """Decoder results copied to the host once per call: no synchronisation inside the batch loop."""
    if not decoded:
        return
    frames = np.concatenate([d[0] for d in decoded])
    abdomen = torch.cat([d[1] for d in decoded]).cpu()
    scores.mask_fractions[frames] = torch.cat([d[2] for d in decoded]).cpu().numpy()
    for row, frame in enumerate(frames.tolist()):
        scores.abdomen_maps[frame] = abdomen[row]


class _BatchLoader:
    """Cuts batches of frames out of the stack in a background thread, one batch ahead of the consumer.

    Fancy-indexing a (840, 562, 744) stack copies the frames; on CUDA the copy goes into pinned memory so
    that the host-to-device transfer is asynchronous. numpy and the copy release the GIL, so this overlaps
    with the network on the main thread.
    """

    def __init__(self, stack: np.ndarray, batches: Sequence[np.ndarray], rows: Callable[[np.ndarray], np.ndarray],
                 pin: bool, prefetch: bool):
        self.stack, self.batches, self.rows, self.pin = stack, list(batches), rows, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-loader") if prefetch else None

    def _load(self, chunk: np.ndarray) -> torch.Tensor:
        frames = torch.from_numpy(np.ascontiguousarray(self.stack[self.rows(chunk)]))
        return frames.pin_memory() if self.pin else frames

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self.pool is None:
            for chunk in self.batches:
                yield chunk, self._load(chunk)
            return
        try:
            ahead: Future | None = self.pool.submit(self._load, self.batches[0]) if self.batches else None
            for i, chunk in enumerate(self.batches):
                frames = ahead.result()
                ahead = self.pool.submit(self._load, self.batches[i + 1]) if i + 1 < len(self.batches) else None
                yield chunk, frames
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Pending:
    """An encoded frame whose decode decision waits for a later frame of the same call."""

    inputs: torch.Tensor  # (1, 3, s, s)
    features: list[torch.Tensor]  # four (1, width, g, g)


@dataclass(frozen=True)
class FrameSearch:
    """Dense or coarse-to-fine search over a stack, with the lazy decoder's decisions.

    `FrameSearch.for_network(network)` resolves the automatic settings for that network;
    `search(stack, network, frames)` runs it on the `frames` that `frames_to_encode(stack)` allows.
    """

    config: InferenceConfig
    coarse_stride: int = 1  # 1: every frame
    lazy_decoder: bool = True
    tta: str = "none"  # none | flip (resolved: never auto)

    @classmethod
    def for_network(cls, network: "Network") -> "FrameSearch":
        inference = network.config.inference
        stride = resolve_coarse_stride(inference, network.device, network.config.model.width)
        return cls(inference, stride, inference.decodes_lazily, resolve_tta(inference, network.device))

    def describe(self) -> dict:
        return {"coarse_stride": self.coarse_stride, "lazy_decoder": self.lazy_decoder, "tta": self.tta}

    def network_rows(self, stack: np.ndarray, network: "Network") -> Callable[[np.ndarray], np.ndarray]:
        """frame numbers -> the stack rows the network's input is made of (the frames, or their triplets)."""
        input_frames = network.config.model.input_frames
        return lambda frames: input_rows(frames, len(stack), self.config.sweeps, input_frames)

    def frames_to_encode(self, stack: np.ndarray) -> np.ndarray:
        """Every frame except probe lift-off."""
        return np.flatnonzero(~liftoff_frames(stack, self.config.liftoff_max_mean))

    def __call__(self, stack: np.ndarray, network: "Network", frames: np.ndarray,
                 progress: SearchProgress | None = None, timer: StageTimer | None = None) -> Searched:
        """Run `network` on the frames of `stack` this search picks among `frames`."""
        progress = progress or SearchProgress()
        timer = timer or StageTimer(network.device)
        n_frames = len(stack)
        scores = FrameScores.empty(n_frames)
        details: dict = {"coarse_stride": self.coarse_stride, "lift_off_frames": int(n_frames - len(frames)),
                         "precision": network.precision, "batch_size": network.batch_size,
                         "lazy_decoder": self.lazy_decoder}
        progress.start(n_frames, len(frames))
        if self.coarse_stride <= 1:
            progress.stage("scan", len(frames))
            self.score_frames(stack, network, frames, scores, progress, timer)
        else:
            details.update(self.coarse_to_fine(stack, network, frames, scores, progress, timer))
        details["frames_reencoded"] = self.complete_masks(stack, network, scores, progress, timer) \
            if self.lazy_decoder else 0
        details["tta"] = self.tta
        details["frames_augmented"] = self.augment(stack, network, scores, progress, timer) \
            if self.tta == "flip" else 0
        encoded = int(scores.scored.sum()) + details["frames_reencoded"] + details["frames_augmented"]
        progress.finish(encoded, int(scores.decoded.sum()))
        return Searched(scores, encoded, details)

    # ------------------------------------------------------------------------------------------ one pass

    @torch.inference_mode()
    def score_frames(self, stack: np.ndarray, network: "Network", indices: np.ndarray, scores: FrameScores,
                     progress: SearchProgress | None = None, timer: StageTimer | None = None) -> None:
        """Run the network on `indices` of the stack, filling `scores` in place.

        Every frame gets its frame-head probabilities; the mask decoder runs on every frame, or with the lazy
        decoder on the frames that `needs_mask` picks (deciding a frame waits until the frames of its
        smoothing window that this call encodes are known). Device results reach the host when decisions
        need them (after every batch on the CPU, once per call on CUDA) and at the end.
        """
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        if len(indices) == 0:
            return
        progress = progress or SearchProgress()
        timer = timer or StageTimer(network.device)
        size = network.batch_size
        chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
        loader = _BatchLoader(stack, chunks, self.network_rows(stack, network), pin=network.device.type == "cuda",
                              prefetch=self.config.prefetch and len(chunks) > 1)
        encoded: Encoded = []  # frame-head results not yet on the host
        decoded: Decoded = []  # decoder results, likewise
        pending: dict[int, _Pending] = {}
        for position, (chunk, frames) in enumerate(loader):
            with timer.device_span("preprocess"):
                inputs = network.preprocess(frames)
            with timer.device_span("encode"):
                features, probabilities = network.encode(inputs)
            encoded.append((chunk, probabilities))
            if not self.lazy_decoder:
                with timer.device_span("decode"):
                    decoded.append((chunk, *network.decode(inputs, features)))
            else:
                for row, frame in enumerate(chunk.tolist()):
                    pending[frame] = _Pending(inputs[row:row + 1], [f[row:row + 1] for f in features])
                last = position == len(chunks) - 1
                if last or len(pending) >= network.waiting_limit:
                    copy_probabilities(encoded, scores)
                    next_frame = None if last else int(chunks[position + 1][0])
                    ready = self._decide(scores, sorted(pending), next_frame)
                    chosen = [frame for frame, go in ready.items() if go]
                    items = [pending.pop(frame) for frame in chosen]
                    for frame in ready:
                        pending.pop(frame, None)  # decided against: features dropped
                    decoded += self._decode_pending(network, np.array(chosen, dtype=np.int64), items, timer)
            progress.advance(len(chunk))
        assert not pending, "the last batch has no later frame to wait for"
        copy_probabilities(encoded, scores)
        copy_masks(decoded, scores)

    def _decode_pending(self, network: "Network", frames: np.ndarray, items: list[_Pending],
                        timer: StageTimer) -> Decoded:
        """Decode waiting frames: in batches of the batch size where the network pads its calls (CUDA), at
        once elsewhere (the network bounds the CPU's memory itself). Results stay on the device."""
        size = network.batch_size if network.pad_batches else max(len(items), 1)
        out = []
        for start in range(0, len(items), size):
            part = items[start:start + size]
            inputs = torch.cat([item.inputs for item in part])
            features = [torch.cat(maps) for maps in zip(*(item.features for item in part))]
            with timer.device_span("decode"):
                out.append((frames[start:start + size], *network.decode(inputs, features)))
        return out

    # ------------------------------------------------------------------------------------------ lazy decoder

    def _window(self, frame: int, bounds: tuple[int, int]) -> tuple[int, int]:
        """[lo, hi] of the smoothing window of `frame` inside its sweep (select.nan_moving_average's)."""
        window = max(1, self.config.smoothing_window)
        half = window // 2
        return max(bounds[0], frame - half), min(bounds[1] - 1, frame + (window - 1 - half))

    def _sweep_of(self, n_frames: int) -> Callable[[int], tuple[int, int]]:
        bounds = sweep_bounds(n_frames, self.config.sweeps)
        starts = np.array([b[0] for b in bounds])
        return lambda frame: bounds[int(np.searchsorted(starts, frame, side="right")) - 1]

    def needs_mask(self, scores: FrameScores, frame: int, sweep: tuple[int, int]) -> bool:
        """Could `frame` be chosen? Only if some encoded frame of its smoothing window has
        P(optimal) + P(suboptimal) >= min_quality_probability (the smoothed value is a mean of those)."""
        lo, hi = self._window(frame, sweep)
        window = scores.probabilities[lo:hi + 1]
        p_abdomen = window[:, FRAME_OPTIMAL] + window[:, FRAME_SUBOPTIMAL]
        p_abdomen = p_abdomen[~np.isnan(p_abdomen)]
        return bool(p_abdomen.size) and float(p_abdomen.max()) >= self.config.min_quality_probability - _DECODE_SLACK

    def _decide(self, scores: FrameScores, frames: list[int], next_frame: int | None) -> dict[int, bool]:
        """Decode decisions for the frames whose window holds no frame still to come in this call."""
        sweep_of = self._sweep_of(len(scores.mask_fractions))
        decided = {}
        for frame in frames:
            sweep = sweep_of(frame)
            _, hi = self._window(frame, sweep)
            if next_frame is not None and next_frame <= hi:
                continue  # a later frame of this call lies in the window: decide with the next batch
            decided[frame] = self.needs_mask(scores, frame, sweep)
        return decided

    def complete_masks(self, stack: np.ndarray, network: "Network", scores: FrameScores,
                       progress: SearchProgress | None = None, timer: StageTimer | None = None) -> int:
        """Decode frames that became choosable after their batch was decided (a neighbour encoded by a later
        call of the coarse search): they are encoded again with the decoder. Returns how many."""
        sweep_of = self._sweep_of(len(scores.mask_fractions))
        missing = [f for f in np.flatnonzero(scores.scored & ~scores.decoded).tolist()
                   if self.needs_mask(scores, f, sweep_of(f))]
        if missing:
            progress = progress or SearchProgress()
            progress.stage("late masks", len(missing))
            self._encode_and_decode(stack, network, np.array(missing), scores, progress,
                                    timer or StageTimer(network.device))
        return len(missing)

    @torch.inference_mode()
    def _encode_and_decode(self, stack: np.ndarray, network: "Network", frames: np.ndarray, scores: FrameScores,
                           progress: SearchProgress, timer: StageTimer) -> None:
        decoded: Decoded = [(chunk, abdomen, fractions) for chunk, _, abdomen, fractions
                            in self._whole_passes(stack, network, frames, progress, timer)]
        copy_masks(decoded, scores)

    def _whole_passes(self, stack: np.ndarray, network: "Network", frames: np.ndarray, progress: SearchProgress,
                      timer: StageTimer, mirrored: bool = False
                      ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Encoder and decoder on `frames` (their mirror images with `mirrored`), batch by batch: per batch the
        frames, frame-head probabilities, abdomen maps and mask fractions, on the device."""
        rows = self.network_rows(stack, network)
        for start in range(0, len(frames), network.batch_size):
            chunk = frames[start:start + network.batch_size]
            pixels = stack[rows(chunk)][..., ::-1] if mirrored else stack[rows(chunk)]
            with timer.device_span("preprocess"):
                inputs = network.preprocess(torch.from_numpy(np.ascontiguousarray(pixels)))
            with timer.device_span("encode"):
                features, probabilities = network.encode(inputs)
            with timer.device_span("decode"):
                abdomen, fractions = network.decode(inputs, features)
            yield chunk, probabilities, abdomen, fractions
            progress.advance(len(chunk))

    # ------------------------------------------------------------------------------------------ test-time flip

    @torch.inference_mode()
    def augment(self, stack: np.ndarray, network: "Network", scores: FrameScores,
                progress: SearchProgress | None = None, timer: StageTimer | None = None) -> int:
        """Test-time flip on the decoded frames (the only ones that can be chosen): each frame's mirror image
        goes through encoder and decoder too, and its frame-head probabilities and its abdomen map (mirrored
        back) are averaged with the frame's own; the mask fraction is recomputed from the averaged map.
        Returns how many frames were augmented."""
        frames = np.flatnonzero(scores.decoded)
        if not len(frames):
            return 0
        progress = progress or SearchProgress()
        progress.stage("test-time flip", len(frames))
        threshold = self.config.mask_threshold
        for chunk, probabilities, abdomen, _ in self._whole_passes(stack, network, frames, progress,
                                                                   timer or StageTimer(network.device),
                                                                   mirrored=True):
            mirrored = abdomen.flip(-1).float().cpu()
            scores.probabilities[chunk] = 0.5 * (scores.probabilities[chunk] + probabilities.float().cpu().numpy())
            for row, frame in enumerate(chunk.tolist()):
                averaged = 0.5 * (scores.abdomen_maps[frame].float() + mirrored[row])
                scores.abdomen_maps[frame] = averaged.half()
                scores.mask_fractions[frame] = float((averaged >= threshold).float().mean())
        return int(len(frames))

    # ------------------------------------------------------------------------------------------ coarse to fine

    def coarse_frames(self, candidates: np.ndarray, n_frames: int, stride: int) -> np.ndarray:
        """Every `stride`-th candidate (non-lift-off) frame of each sweep, starting half a stride in."""
        chosen = []
        for start, stop in sweep_bounds(n_frames, self.config.sweeps):
            inside = candidates[(candidates >= start) & (candidates < stop)]
            chosen.append(inside[min(stride // 2, max(len(inside) - 1, 0))::stride])
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def refine_centres(self, scores: FrameScores) -> list[int]:
        """The best `refine_candidates` encoded frames of each sweep, ranked as `select` ranks frames
        (tier, evidence, mask size), at least `refine_radius` apart, among the frames whose smoothed
        P(abdomen) reaches REFINE_FLOOR x min_quality_probability."""
        config = self.config
        probs = scores.probabilities
        centres = []
        for start, stop in sweep_bounds(len(probs), config.sweeps):
            encoded = np.flatnonzero(scores.scored[start:stop])
            if not len(encoded):
                continue
            smoothed = nan_moving_average(probs[start:stop], config.smoothing_window)
            p_abdomen = smoothed[:, FRAME_OPTIMAL] + smoothed[:, FRAME_SUBOPTIMAL]
            area = np.nan_to_num(scores.mask_fractions[start:stop], nan=0.0)
            tier, score = frame_tiers(smoothed, area, config)
            floor = REFINE_FLOOR * config.min_quality_probability
            rank = evidence(score, area)
            keys = [(tier[i], rank[i], score[i], area[i], -i) for i in encoded if p_abdomen[i] >= floor]
            taken: list[int] = []
            for key in sorted(keys, reverse=True):
                frame = -int(key[-1])
                if all(abs(frame - t) > config.refine_radius for t in taken):
                    taken.append(frame)
                if len(taken) >= max(1, config.refine_candidates):
                    break
            centres += [start + t for t in taken]
        return centres

    def coarse_to_fine(self, stack: np.ndarray, network: "Network", candidates: np.ndarray, scores: FrameScores,
                       progress: SearchProgress | None = None, timer: StageTimer | None = None) -> dict:
        """Coarse pass, then refinement rounds around the best frames of every sweep until they settle."""
        progress = progress or SearchProgress()
        n_frames = len(stack)
        stride = self.coarse_stride
        coarse = self.coarse_frames(candidates, n_frames, stride)
        progress.stage(f"coarse pass, stride {stride}", len(coarse))
        self.score_frames(stack, network, coarse, scores, progress, timer)
        allowed = np.zeros(n_frames, dtype=bool)
        allowed[candidates] = True
        radius = max(1, self.config.refine_radius)
        rounds = []
        for _ in range(MAX_REFINE_ROUNDS):
            wanted = set()
            for centre in self.refine_centres(scores):
                lo, hi = max(0, centre - radius), min(n_frames - 1, centre + radius)
                wanted.update(f for f in range(lo, hi + 1) if allowed[f] and not scores.scored[f])
            if not wanted:
                break
            rounds.append(len(wanted))
            progress.stage(f"refinement {len(rounds)}", len(wanted))
            self.score_frames(stack, network, np.array(sorted(wanted)), scores, progress, timer)
        return {"coarse_frames": int(len(coarse)), "refine_rounds": rounds}
