"""Release layout (real or replica) -> per-split arrays of 224 x 224 frames, masks and frame labels.

    python -m training prepare --data DIR --out DIR [--seed 0] [--all-sweeps] [--fractions 0.7 0.1 0.2]

* Which frames: every frame of each sweep that has a reference AC in the circumference CSV, as the paper
  did (the other sweeps were never searched for a plane by the annotators, so their "no abdomen" labels are
  less trustworthy); `--all-sweeps` keeps every sweep.
* Geometry: `algorithm.preprocess.pad_to_square` + `resize_frames` (the very functions inference runs), grey
  stored as uint8; masks padded the same way and resized nearest-neighbour ("nearest-exact": pixel centres
  line up with the bicubic image resize, torch's plain "nearest" is shifted by half a pixel).
* Labels per frame, in the frame head's order: FRAME_OPTIMAL when the full-resolution mask holds a 1,
  FRAME_SUBOPTIMAL when it holds a 2, FRAME_NONE otherwise.
* Split 70/10/20 by subject with a fixed seed (a subject's cases never straddle splits, so the test split
  measures generalisation to new pregnancies), written with the counts to manifest.json so runs compare.
* Memory: one case at a time (a real case is 840 x 562 x 744 = 351 MB), frames converted in chunks,
  outputs written into preallocated .npy memmaps (the whole real release is ~17 GB of output for all
  frames of the sweeps with an AC).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm

from algorithm.config import FRAME_CLASS_NAMES, SWEEPS_PER_CASE
from algorithm.preprocess import pad_to_square, resize_frames
from training.cli import CommandParser, MissingInput, UsageError, existing_folder, number, run_command
from training.data import layout
from training.data.dataset import ARRAYS, MANIFEST, SPLITS, frame_labels
from training.staging import StagedFolder

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
IMAGE_SIZE = 224
CHUNK = 64  # frames converted at once: 64 x 562 x 744 float32 = 107 MB


def read_circumferences(data: Path) -> dict[str, dict]:
    """uuid -> {"subject": id, "ac": [mm or None] * 6} from the release CSV (empty dict if absent)."""
    path = Path(data) / layout.CIRCUMFERENCES_CSV
    if not path.is_file():
        return {}
    table = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            acs = [row.get(f"sweep_{k}_ac_mm", "") for k in range(1, SWEEPS_PER_CASE + 1)]
            table[row["uuid"]] = {
                "subject": (row.get("subject_id") or row["uuid"]).strip(),
                "ac": [float(v) if (v or "").strip() else None for v in acs],
            }
    return table


def split_by_subject(subjects: dict[str, str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     seed: int = 0) -> dict[str, list[str]]:
    """Cases -> {train, val, test} uuid lists, whole subjects per split, deterministic in `seed`.

    Subjects are shuffled, then test and val are filled (in that order) until they hold their share of
    the *cases*; the rest is train. With at least three subjects, val and test get at least one each.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise UsageError(f"fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    by_subject: dict[str, list[str]] = defaultdict(list)
    for uuid, subject in subjects.items():
        by_subject[subject].append(uuid)
    order = sorted(by_subject)
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    n_cases = len(subjects)
    targets = {"test": fractions[2] / total * n_cases, "val": fractions[1] / total * n_cases}
    minimum = 1 if len(order) >= 3 else 0
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    position = 0
    for name in ("test", "val"):
        wanted = max(round(targets[name]), minimum if targets[name] > 0 else 0)
        while position < len(order) and len(splits[name]) < wanted and len(order) - position > 1:
            splits[name].extend(sorted(by_subject[order[position]]))
            position += 1
    for subject in order[position:]:
        splits["train"].extend(sorted(by_subject[subject]))
    return {name: sorted(uuids) for name, uuids in splits.items()}


def stack_depth(path: Path) -> int:
    """Number of frames of an .mha stack, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(reader.GetSize()[2])


def selected_frames(n_frames: int, acs: Sequence[float | None], all_sweeps: bool) -> list[tuple[int, int]]:
    """(frame, sweep) pairs to keep: sweeps are consecutive blocks of n_frames // 6 (training.scoring.metrics)."""
    length = max(1, n_frames // SWEEPS_PER_CASE)
    keep = []
    for sweep in range(SWEEPS_PER_CASE):
        has_ac = sweep < len(acs) and acs[sweep] is not None
        if all_sweeps or has_ac:
            start, stop = sweep * length, (sweep + 1) * length if sweep < SWEEPS_PER_CASE - 1 else n_frames
            keep.extend((frame, sweep) for frame in range(start, stop))
    return keep


def resize_images(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size) uint8 through algorithm.preprocess (what inference sees)."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).unsqueeze(1).float()
    resized = resize_frames(pad_to_square(tensor), size)
    return resized.round_().to(torch.uint8)[:, 0].numpy()


def resize_masks(masks: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, H, W) label maps -> (N, size, size), padded like the images, nearest-neighbour (labels kept)."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).unsqueeze(1).float()
    resized = F.interpolate(pad_to_square(tensor), size=(size, size), mode="nearest-exact")
    return resized.to(torch.uint8)[:, 0].numpy()


PREPARE_VERSION = 1  # bump when the prepared arrays' content changes for the same inputs


def prepare_key(data: Path, seed: int = 0, all_sweeps: bool = False,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, size: int = IMAGE_SIZE,
                replica: bool | None = None) -> dict:
    """Everything the prepared arrays depend on: the parameters and a fingerprint of the input files (name,
    size and modification time of every image, mask and the circumference CSV). Equal keys mean equal
    content, so a cache can be reused; any change makes `prepare` run again."""
    data = Path(data).resolve()
    digest = hashlib.sha256()
    files = [layout.image_path(data, u) for u in layout.list_case_ids(data)]
    files += [layout.mask_path(data, u) for u in layout.list_case_ids(data)] + [data / layout.CIRCUMFERENCES_CSV]
    for path in files:
        stat = path.stat() if path.is_file() else None
        digest.update(f"{path.relative_to(data)}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}\n"
                      .encode())
    return {"version": PREPARE_VERSION, "data": str(data), "files_sha256": digest.hexdigest(), "seed": int(seed),
            "all_sweeps": bool(all_sweeps), "fractions": [float(f) for f in fractions], "image_size": int(size),
            "replica": is_replica(data) if replica is None else bool(replica)}


def prepared_matches(prepared: Path, key: dict) -> bool:
    """Whether `prepared` holds a finished preparation made with exactly `key`."""
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def read_array(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path), sitk.sitkUInt8)
    return sitk.GetArrayFromImage(image)


def prepare(data: Path, out: Path, seed: int = 0, all_sweeps: bool = False,
            fractions: Sequence[float] = DEFAULT_FRACTIONS, size: int = IMAGE_SIZE,
            progress: bool = True, replica: bool | None = None) -> dict:
    """Write the prepared splits and manifest.json under `out`; returns the manifest.

    `out` appears only complete (training.staging): written as `<out>.partial`, which a preparation cut
    short removes. `replica` records whether the data is the replica (None: detect it, see `is_replica`);
    training puts "not for clinical use" into the provenance of weights trained on it.
    """
    data = Path(data)
    folder = StagedFolder(Path(out), MANIFEST)
    folder.check()
    uuids = layout.list_case_ids(data)
    if not uuids:
        raise MissingInput(f"no cases in {data / layout.IMAGES_DIR}")
    missing_masks = [u for u in uuids if not layout.mask_path(data, u).is_file()]
    if missing_masks:
        raise MissingInput(f"{len(missing_masks)} case(s) without a mask stack, e.g. "
                           f"{layout.mask_path(data, missing_masks[0])}")
    try:
        manifest = _prepare(data, uuids, folder.start(), seed, all_sweeps, fractions, size, progress, replica)
        folder.commit()
    except BaseException:
        folder.discard()
        raise
    return manifest


def _prepare(data: Path, uuids: list[str], out: Path, seed: int, all_sweeps: bool, fractions: Sequence[float],
             size: int, progress: bool, replica: bool | None) -> dict:
    started = time.perf_counter()
    key = prepare_key(data, seed, all_sweeps, fractions, size, replica)
    circumferences = read_circumferences(data)
    info = {u: circumferences.get(u, {"subject": u, "ac": [None] * SWEEPS_PER_CASE}) for u in uuids}
    splits = split_by_subject({u: info[u]["subject"] for u in uuids}, fractions, seed)

    # Frame lists from the headers first, so every output array is allocated once at its final size.
    plan = {u: selected_frames(stack_depth(layout.image_path(data, u)), info[u]["ac"], all_sweeps) for u in uuids}
    counts: dict[str, dict] = {}
    with tqdm(total=sum(len(v) for v in plan.values()), unit="frame", desc="prepare", disable=not progress) as bar:
        for split in SPLITS:
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            n = sum(len(plan[u]) for u in splits[split])
            arrays = {
                "images": np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (n, size, size)),
                "masks": np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, (n, size, size)),
                "labels": np.lib.format.open_memmap(folder / "labels.npy", "w+", np.int8, (n,)),
                "index": np.lib.format.open_memmap(folder / "index.npy", "w+", np.int32, (n, 3)),
            }
            row = 0
            for case_number, uuid in enumerate(splits[split]):
                bar.set_postfix_str(f"{split} {uuid[:8]}")
                frames = np.array([f for f, _ in plan[uuid]], dtype=np.int64)
                sweeps = np.array([s for _, s in plan[uuid]], dtype=np.int64)
                if len(frames) == 0:
                    continue
                image = read_array(layout.image_path(data, uuid))
                mask = read_array(layout.mask_path(data, uuid))
                if image.shape != mask.shape:
                    raise UsageError(f"{uuid}: image {image.shape} and mask {mask.shape} differ")
                for start in range(0, len(frames), CHUNK):
                    chunk = frames[start:start + CHUNK]
                    rows = slice(row + start, row + start + len(chunk))
                    arrays["images"][rows] = resize_images(image[chunk], size)
                    arrays["masks"][rows] = resize_masks(mask[chunk], size)
                    arrays["labels"][rows] = frame_labels(mask[chunk])
                    arrays["index"][rows] = np.stack([np.full(len(chunk), case_number), chunk,
                                                      sweeps[start:start + len(chunk)]], axis=1)
                    bar.update(len(chunk))
                row += len(frames)
                del image, mask
            for array in arrays.values():
                array.flush()
            labels = np.asarray(arrays["labels"], dtype=np.int64)
            by_class = np.bincount(labels, minlength=len(FRAME_CLASS_NAMES))
            counts[split] = {
                "cases": len(splits[split]),
                "subjects": len({info[u]["subject"] for u in splits[split]}),
                "frames": int(n),
                **{name: int(c) for name, c in zip(FRAME_CLASS_NAMES, by_class)},
            }
            del arrays

    manifest = {
        "data": str(data.resolve()),
        "replica": is_replica(data) if replica is None else bool(replica),
        "seed": seed,
        "fractions": list(fractions),
        "split_by": "subject",
        "all_sweeps": all_sweeps,
        "image_size": size,
        "splits": splits,
        "subjects": {u: info[u]["subject"] for u in uuids},
        "reference_ac_mm": {u: info[u]["ac"] for u in uuids},
        "counts": counts,
        "arrays": list(ARRAYS),
        "seconds": round(time.perf_counter() - started, 1),
        "key": key,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_replica(data: Path) -> bool:
    """Whether `data` was written by training.data.replica (its marker file or README says so)."""
    data = Path(data)
    for name in ("replica.json", "REPLICA", "README.md", "README.txt"):
        path = data / name
        if path.is_file():
            if name in ("replica.json", "REPLICA"):
                return True
            try:
                text = path.read_text(errors="ignore").lower()
            except OSError:
                continue
            if "replica" in text or "phantom" in text:
                return True
    return False


def describe(manifest: dict) -> str:
    lines = [f"{'split':6} {'cases':>5} {'subj':>5} {'frames':>7} " +
             " ".join(f"{n:>10}" for n in FRAME_CLASS_NAMES)]
    for split in SPLITS:
        c = manifest["counts"][split]
        lines.append(f"{split:6} {c['cases']:5d} {c['subjects']:5d} {c['frames']:7d} " +
                     " ".join(f"{c[n]:10d}" for n in FRAME_CLASS_NAMES))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=existing_folder, required=True, help="release-layout folder (real or replica)")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the prepared splits go; written as OUT.partial until complete")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--all-sweeps", action="store_true", help="keep sweeps without a reference AC too")
    parser.add_argument("--fractions", type=number(float, minimum=0), nargs=3, default=DEFAULT_FRACTIONS,
                        metavar=("TRAIN", "VAL", "TEST"), help="shares of the cases per split, by subject")
    parser.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                        help="the data is the replica (default: detected from a replica.json marker)")
    args = parser.parse_args(argv)
    return run_command(lambda: _prepare_command(args))


def _prepare_command(args: argparse.Namespace) -> int:
    manifest = prepare(args.data, args.out, args.seed, args.all_sweeps, args.fractions, replica=args.replica)
    print(describe(manifest))
    print(f"manifest: {args.out / MANIFEST}  ({manifest['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
