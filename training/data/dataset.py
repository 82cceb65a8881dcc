"""Prepared frames on disk -> training samples.

`python -m training prepare` writes one folder per split holding memory-mappable arrays:

    <prepared>/manifest.json            seed, case uuids per split, subjects, counts (see training.data.prepare)
    <prepared>/<split>/images.npy       (N, 224, 224) uint8 grey, already padded to square and resized
    <prepared>/<split>/masks.npy        (N, 224, 224) uint8 release labels: 0 bg, 1 optimal, 2 suboptimal
    <prepared>/<split>/labels.npy       (N,) int8 frame class in the head's order (FRAME_NONE/SUBOPTIMAL/OPTIMAL)
    <prepared>/<split>/index.npy        (N, 3) int32 (case number in the split's uuid list, frame, sweep)

Images are stored after `algorithm.preprocess.pad_to_square` + `resize_frames`, so the only step left at
training time is (optional) augmentation and `algorithm.preprocess.normalise`: exactly what inference does,
up to the rounding of the resized grey levels to uint8 (< 0.5 grey level).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from algorithm.config import FRAME_NONE, FRAME_OPTIMAL, FRAME_SUBOPTIMAL, INPUT_FRAMES
from algorithm.preprocess import normalise
from training.cli import MissingInput, existing_folder

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
ARRAYS = ("images", "masks", "labels", "index")

# Release mask values (training.scoring.metrics.GT_OPTIMAL / GT_SUBOPTIMAL).
MASK_OPTIMAL, MASK_SUBOPTIMAL = 1, 2

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def frame_labels(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) release masks -> (N,) head classes: optimal if any pixel is 1, else suboptimal if any
    is 2, else none. (The release never marks both on one frame; optimal wins if it did.)"""
    flat = np.asarray(masks).reshape(len(masks), -1)
    optimal = (flat == MASK_OPTIMAL).any(axis=1)
    suboptimal = (flat == MASK_SUBOPTIMAL).any(axis=1)
    return np.where(optimal, FRAME_OPTIMAL, np.where(suboptimal, FRAME_SUBOPTIMAL, FRAME_NONE)).astype(np.int8)


def temporal_rows(index: np.ndarray) -> np.ndarray:
    """(N, 3) rows of a prepared split holding frames t-1, t, t+1 of each row's sweep, as
    `algorithm.preprocess.input_rows` picks them in a stack: the row itself where the neighbour lies outside
    the sweep (prepare writes a sweep's frames in order, so a neighbour is the next row or none)."""
    index = np.asarray(index, dtype=np.int64)
    rows = np.arange(len(index))

    def neighbour(step: int) -> np.ndarray:
        other = np.clip(rows + step, 0, max(len(index) - 1, 0))
        same_sweep = (index[other, 0] == index[:, 0]) & (index[other, 2] == index[:, 2])
        return np.where(same_sweep & (index[other, 1] == index[:, 1] + step), other, rows)

    return np.stack([neighbour(-1), rows, neighbour(1)], axis=1)


def read_manifest(prepared: Path) -> dict:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `python -m training prepare` first")
    return json.loads(path.read_text())


def prepared_folder(text: str) -> Path:
    """argparse type of --prepared: the output of `python -m training prepare`."""
    path = existing_folder(text)
    if not (path / MANIFEST).is_file():
        raise argparse.ArgumentTypeError(f"{path} holds no {MANIFEST}: run python -m training prepare first")
    return path


@dataclass
class SplitArrays:
    """The four arrays of one split, memory-mapped (nothing is read until indexed)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    uuids: list[str]

    @classmethod
    def open(cls, prepared: Path, split: str) -> "SplitArrays":
        folder = Path(prepared) / split
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        uuids = read_manifest(prepared)["splits"][split]
        return cls(uuids=list(uuids), **arrays)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def positive(self) -> np.ndarray:
        """bool (N,): frames with an annotated abdomen (optimal or suboptimal), the paper's positives."""
        return np.asarray(self.labels) != FRAME_NONE


def to_network_input(grey: np.ndarray | torch.Tensor, temporal: bool = False) -> torch.Tensor:
    """(H, W) or (N, H, W) uint8 grey at network size -> (3, H, W) / (N, 3, H, W) CLIP-normalised float;
    with `temporal` (3, H, W) or (N, 3, H, W) triplets, a frame per channel."""
    array = np.asarray(grey)
    if not array.flags.writeable:  # memmap rows are read-only; torch wants to own writable memory
        array = array.copy()
    tensor = torch.as_tensor(np.ascontiguousarray(array)).float()
    single = tensor.ndim == (3 if temporal else 2)
    if single:
        tensor = tensor[None]
    out = normalise(tensor if temporal else tensor[:, None])  # a grey frame: one channel, repeated
    return out[0] if single else out


class FrameDataset(Dataset):
    """One prepared split as (image (3, S, S) float, abdomen mask (S, S) int64 {0, 1}, frame class int64).

    `augment(grey, mask) -> (grey, mask)` works on uint8 arrays at network size (training.data.augment); the
    release labels are turned into the binary abdomen mask after augmentation, so the nearest-neighbour
    warp never mixes label values.

    `copies` > 0 is the paper's offline augmentation, drawn online: the dataset holds every frame once as it
    is and `copies` more times augmented (items 0..N-1 plain, N.. augmented), so an epoch has the size and
    the plain/augmented mix of the published x2 set. `copies` 0: every item augmented (when `augment`).

    `input_frames` "temporal" (ModelConfig.input_frames) makes each image frames t-1, t, t+1 of its sweep,
    one per channel (`temporal_rows`); the mask and the label are frame t's.
    """

    def __init__(self, prepared: Path, split: str, augment: Augment | None = None, copies: int = 0,
                 input_frames: str = "single"):
        if input_frames not in INPUT_FRAMES:
            raise ValueError(f"input_frames must be one of {INPUT_FRAMES}, got {input_frames!r}")
        self.prepared = Path(prepared)
        self.split = split
        self.temporal = input_frames == "temporal"
        self.rows = temporal_rows(np.load(self.prepared / split / "index.npy")) if self.temporal else None
        self.augment = augment
        self.copies = copies if augment is not None else 0
        self._arrays: SplitArrays | None = None
        # Labels are small: read them now so samplers and class weights need not touch the big arrays.
        self.frame_labels = np.load(self.prepared / split / "labels.npy").astype(np.int64)
        self.labels = np.tile(self.frame_labels, 1 + self.copies)

    @property
    def arrays(self) -> SplitArrays:
        # Opened lazily, so each DataLoader worker maps the files itself instead of pickling views.
        if self._arrays is None:
            self._arrays = SplitArrays.open(self.prepared, self.split)
        return self._arrays

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, ...]:
        """Frame `key`; a key (frame, decode) (training.run.train.MixedBatches) adds the decode flag."""
        k, decode = (key, None) if not isinstance(key, tuple) else key
        i = k % len(self.frame_labels)
        grey = np.asarray(self.arrays.images[self.rows[i] if self.temporal else i])
        mask = np.asarray(self.arrays.masks[i])
        if self.augment is not None and (self.copies == 0 or k >= len(self.frame_labels)):
            grey, mask = self.augment(grey, mask)
        abdomen = torch.from_numpy((mask != 0).astype(np.int64))
        sample = (to_network_input(grey, self.temporal), abdomen, torch.tensor(self.frame_labels[i], dtype=torch.int64))
        return sample if decode is None else sample + (torch.tensor(bool(decode)),)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state
