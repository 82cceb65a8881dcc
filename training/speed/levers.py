"""`python -m training levers`: the algorithm's leaderboard levers on whole test cases, paired per case.

    python -m training levers --weights runs/s1/fetalclipseg.safetensors runs/s2/... --data test --out runs/levers

Every case of a release-layout folder goes once through the network's frame search with every lever off;
the decisions of each variant (`VARIANTS`: selection rule, AC fit, what the mask holds) are then taken on
those same scores (`algorithm.predict.decide`), and the test-time flip runs once more over the decoded
frames (`FrameSearch.augment`), exactly as `python -m algorithm --tta flip` does after its search. So a
variant differs from the baseline in its lever and nothing else, and a case costs one search plus one flip
pass instead of one search per variant.

Each variant is scored as the challenge scores the mask it would write (training.scoring.metrics), and by
the NAE of the AC it reports (result.json's `ac_mm`), which the challenge never reads. With several weights
(training seeds) each case's difference is the mean over them. Against the baseline every variant gets the
mean difference per case and its 95 % bootstrap interval over cases (`bootstrap_interval`); the rule for a
new default is a lower bound above zero. Cost per variant: frames encoded and decoded, CPU seconds per case
measured here, GFLOP per case of the full ViT-L/14 (counted per frame by FlopCounter on a random ViT-L) and
a T4 time from those FLOP (an estimate, labelled so). Results go to `levers.jsonl` (one line per weights,
case and variant; a second run skips what is there), `levers.md`, `levers.json` and `levers.png`.

`--ensemble E.safetensors` (built by `python -m training ensemble` from the `--weights`) adds the ensemble
lever: E runs the same way, and per case its score is paired against the mean of its members' (both with
the levers off, and both with the flip), so the difference is what averaging the members buys over running
one of them. Its FLOP count an encoder pass per member unless the members share one. `--candidate NAME
W1 W2 W3` does the same for a training lever: weights trained another way (one per seed, all else as the
`--weights` were trained), their mean paired against the `--weights`' mean. `--no-flip` skips the flip pass
and every flip row (about 45 % of a case's CPU time in the small configuration): for a training lever whose
question is asked with the levers off.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from algorithm.config import SWEEPS_PER_CASE, Config, InferenceConfig, ModelConfig
from algorithm.contract import read_stack
from algorithm.fov import fov_from_stack
from algorithm.model.checkpoint import read_checkpoint_info
from algorithm.model.fetalclipseg import build_model
from algorithm.network import load_network
from algorithm.predict import decide
from algorithm.search import FrameSearch
from training.cli import CommandParser, MissingInput, UsageError, existing_folder, number, run_command
from training.data import layout
from training.scoring.report_plots import plt, save_figure
from training.scoring.evaluate import list_ground_truth_cases, read_reference_acs
from training.scoring.metrics import case_score, nae_ac
from training.speed.measure import GPU_PEAK_TFLOPS, count_flops

log = logging.getLogger("training")

# Every lever off, whatever the checkpoint or the device would choose (tta "auto" flips on CUDA).
LEVERS_OFF = {"tta": "none", "selection": "frame", "ac_fit": "contour", "mask_output": "mask"}
# name -> the settings it changes from LEVERS_OFF; "baseline" is the reference of every pair
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "tta flip": {"tta": "flip"},
    "selection sweep": {"selection": "sweep"},
    "ac-fit subpixel": {"ac_fit": "subpixel"},
    "ellipse mask": {"mask_output": "ellipse"},
    "ellipse mask, subpixel": {"ac_fit": "subpixel", "mask_output": "ellipse"},
}
JOURNAL = "levers.jsonl"  # one JSON line per weights, case and variant
METRICS = ("score", "wfss", "dsc_soft", "nae_ac", "reported_nae")
# A T4's fraction of its nominal fp16 peak when no GPU check has measured one: an assumption, said so.
ASSUMED_T4_FRACTION = 0.4


def bootstrap_interval(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (paired differences, one per case)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def variant_config(inference: InferenceConfig, name: str) -> InferenceConfig:
    return dataclasses.replace(inference, **{**LEVERS_OFF, **VARIANTS[name]})


def network_passes(network) -> tuple[int, int]:
    """(encoder passes, decoder passes) per frame: 1 and 1, or an ensemble's."""
    members = len(getattr(network, "members", [network]))
    return getattr(network, "encoder_passes", 1), members


def score_case(weights_label: str, uuid: str, stack: np.ndarray, labels: np.ndarray,
               reference: list[float | None], network, search: FrameSearch, flip: bool = True
               ) -> list[dict[str, Any]]:
    """Every variant's record for one case: one search, one flip pass (unless `flip` is False: then no flip
    variant), the decisions on their scores."""
    fov = fov_from_stack(stack)
    shape = stack.shape[1:]
    started = time.process_time()
    found = search(stack, network, search.frames_to_encode(stack))
    search_cpu = time.process_time() - started
    flipped, augmented, flip_cpu = None, 0, 0.0
    if flip:
        flipped = copy.deepcopy(found.scores)
        started = time.process_time()
        augmented = search.augment(stack, network, flipped)
        flip_cpu = time.process_time() - started
    encoder_passes, decoder_passes = network_passes(network)
    records = []
    for name, changes in VARIANTS.items():
        tta = changes.get("tta") == "flip"
        if tta and not flip:
            continue
        scores = flipped if tta else found.scores
        config = variant_config(search.config, name)
        started = time.process_time()
        decision = decide(scores, fov, shape, config)
        decide_cpu = time.process_time() - started
        result = case_score(decision["frame"], decision["mask"], labels, reference, fov=fov)
        records.append({
            "weights": weights_label, "case": uuid, "variant": name, "frame": int(decision["frame"]),
            "score": result.score, "wfss": result.wfss, "dsc_soft": result.dsc_soft, "nae_ac": result.nae_ac,
            "reported_nae": nae_ac(decision["ac_mm"], result.ac_ref_mm),
            "frames_encoded": found.frames_encoded + (augmented if tta else 0),
            "frames_decoded": int(found.scores.decoded.sum()) + (augmented if tta else 0),
            "cpu_seconds": search_cpu + (flip_cpu if tta else 0.0) + decide_cpu,
            "encoder_passes": encoder_passes, "decoder_passes": decoder_passes,
        })
    return records


def run_study(weights: Sequence[Path], data: Path, out: Path, device: str = "cpu", limit: int | None = None,
              progress: bool = True, shard: tuple[int, int] = (1, 1), flip: bool = True) -> list[dict[str, Any]]:
    """Score every variant on every case for every weights file, appending to out/levers.jsonl. `shard`
    (i, n) takes every n-th case from the i-th: n processes, each with its own `out`, share a machine's cores
    (their journals concatenated are one study). Ensembles are weights like any other here; `summarise` is
    told which they are."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_journal(out, weights)
    done = {(r["weights"], r["case"]) for r in records}
    uuids = list_ground_truth_cases(data)[:limit][shard[0] - 1::shard[1]]
    if not uuids:
        raise MissingInput(f"no ground-truth cases under {data / layout.MASKS_DIR}")
    references = read_reference_acs(data)
    labels_of = weights_labels(weights)
    for path in weights:
        network, _ = load_network(path, {"device": device})
        off = dataclasses.replace(network.config.inference, **LEVERS_OFF)
        search = dataclasses.replace(FrameSearch.for_network(network), config=off, tta="none")
        label = labels_of[str(path)]
        todo = [u for u in uuids if (label, u) not in done]
        for uuid in tqdm(todo, desc=label, unit="case", disable=not progress):
            stack = read_stack(layout.image_path(data, uuid)).array
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.mask_path(data, uuid)), sitk.sitkUInt8))
            reference = references.get(uuid, [None] * SWEEPS_PER_CASE)
            case_records = score_case(label, uuid, stack, labels, reference, network, search, flip)
            with (out / JOURNAL).open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in case_records)
            records += case_records
    return [r for r in records if r["case"] in uuids]


def shard_argument(text: str) -> tuple[int, int]:
    """`I/N` with 1 <= I <= N."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 1/2, got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= I <= N, got {text!r}")
    return i, n


def weights_labels(weights: Sequence[Path]) -> dict[str, str]:
    """path -> the label of its records: the run folder's name (numbered when two are alike)."""
    names = [w.parent.name or w.stem for w in weights]
    unique = len(set(names)) == len(names)
    return {str(w): name if unique else f"{k + 1}:{name}" for k, (w, name) in enumerate(zip(weights, names))}


def read_journal(out: Path, weights: Sequence[Path]) -> list[dict[str, Any]]:
    """The records of these weights already in out/levers.jsonl."""
    journal = out / JOURNAL
    labels = set(weights_labels(weights).values())
    records = [json.loads(line) for line in journal.read_text().splitlines()] if journal.is_file() else []
    return [r for r in records if r["weights"] in labels]


def full_size_model(weights: Sequence[Path]) -> ModelConfig:
    """The model whose FLOP are counted: FetalCLIP's ViT-L/14 with the decoder the weights have."""
    decoders = sorted({read_checkpoint_info(path).config.decoder for path in weights})
    if len(decoders) != 1:
        raise UsageError(f"the --weights have different decoders ({', '.join(decoders)}); FLOP are counted for "
                         "one architecture: study them apart, or pass --no-flops")
    return dataclasses.replace(Config().model, decoder=decoders[0])


def per_frame_gflop(config: ModelConfig) -> dict[str, float]:
    """GFLOP of one frame through the encoder and through the decoder of a randomly initialised model."""
    model = build_model(dataclasses.replace(config, use_lora=False)).eval()
    with torch.inference_mode():
        return count_flops(model, config, torch.device("cpu"))


def summarise(records: Sequence[dict[str, Any]], gflop: dict[str, float] | None = None,
              ensembles: Sequence[str] = (), candidates: Mapping[str, Sequence[str]] | None = None
              ) -> dict[str, Any]:
    """Per variant: means, paired differences against the baseline with bootstrap intervals, and cost.

    `ensembles`: the labels of ensemble weights; each adds the rows "ensemble LABEL" (against the mean of
    the single weights, levers off), "ensemble LABEL, tta flip" (against their flip) and "ensemble LABEL: tta
    flip against it alone" (the flip as a lever of the ensemble: its flip against itself). `candidates`: name
    -> the labels of weights trained another way (a training lever, one per seed); each adds the rows NAME
    and "NAME, tta flip", their mean against the single weights' mean likewise."""
    candidates = {name: list(labels) for name, labels in (candidates or {}).items()}
    others = set(ensembles) | {label for labels in candidates.values() for label in labels}
    weights = sorted({r["weights"] for r in records} - others)
    cases = sorted({r["case"] for r in records if r["variant"] == "baseline"})
    table = {(r["weights"], r["case"], r["variant"]): r for r in records}
    # a study run with --no-flip has no flip records, and then no flip rows
    flipped = any(r["variant"] == "tta flip" for r in records)
    variants = [v for v in VARIANTS if flipped or VARIANTS[v].get("tta") != "flip"]
    complete = [c for c in cases if all((w, c, v) in table for w in [*weights, *others] for v in variants)]
    summary: dict[str, Any] = {"weights": weights, "ensembles": list(ensembles), "candidates": candidates,
                               "cases": len(complete), "variants": {}}

    def rows_of(labels: Sequence[str], variant: str) -> list[list[dict[str, Any]]]:
        return [[table[(w, c, variant)] for w in labels] for c in complete]

    # row -> (the weights it averages, their variant, (the weights and variant it is paired with) or None, tags)
    rows_to_compare = {name: (weights, name, (weights, "baseline") if name != "baseline" else None, {})
                       for name in variants}
    paired = [("baseline", ""), ("tta flip", ", tta flip")][:2 if flipped else 1]
    for label in ensembles:
        for variant, suffix in paired:
            rows_to_compare[f"ensemble {label}{suffix}"] = ([label], variant, (weights, variant), {"ensemble": label})
        if flipped:  # the flip as a lever of the ensemble itself: what it adds once the members are averaged
            rows_to_compare[f"ensemble {label}: tta flip against it alone"] = (
                [label], "tta flip", ([label], "baseline"), {"lever_of": label})
    for name, labels in candidates.items():
        for variant, suffix in paired:
            rows_to_compare[f"{name}{suffix}"] = (labels, variant, (weights, variant), {"candidate": labels})
    for name, (labels, variant, against, tags) in rows_to_compare.items():
        rows = rows_of(labels, variant)
        entry: dict[str, Any] = {"settings": {**LEVERS_OFF, **VARIANTS[variant]}, **tags}
        for metric in METRICS:
            per_case = np.array([np.mean([r[metric] for r in row]) for row in rows])
            entry[metric] = float(per_case.mean()) if len(per_case) else None
            if against is not None:
                base = rows_of(*against)
                diff = per_case - np.array([np.mean([r[metric] for r in row]) for row in base])
                low, high = bootstrap_interval(diff)
                entry[f"{metric}_difference"] = {"mean": float(diff.mean()), "low": low, "high": high,
                                                 "higher": int((diff > 1e-9).sum()),
                                                 "lower": int((diff < -1e-9).sum())}
        flat = [r for row in rows for r in row]
        encoded = float(np.mean([r["frames_encoded"] for r in flat]))
        decoded = float(np.mean([r["frames_decoded"] for r in flat]))
        entry.update(frames_encoded=encoded, frames_decoded=decoded,
                     cpu_seconds=float(np.mean([r["cpu_seconds"] for r in flat])),
                     encoder_passes=int(flat[0].get("encoder_passes", 1)) if flat else 1,
                     decoder_passes=int(flat[0].get("decoder_passes", 1)) if flat else 1)
        if gflop:
            total = (encoded * entry["encoder_passes"] * gflop["encoder_gflop"]
                     + decoded * entry["decoder_passes"] * gflop["decoder_gflop"])
            entry["vit_l_gflop"] = total
            entry["t4_seconds_estimate"] = total / (GPU_PEAK_TFLOPS["T4"] * 1e3 * ASSUMED_T4_FRACTION)
        summary["variants"][name] = entry
    verdicts = {}
    for name, entry in summary["variants"].items():
        if name != "baseline":
            better = entry["score_difference"]["low"] > 0
            # an ensemble is a choice of exported weights, a candidate one of training: not algorithm defaults
            verdict = "export it" if "ensemble" in entry else "train with it" if "candidate" in entry else "default"
            verdicts[name] = verdict if better else "option"
    summary["verdicts"] = verdicts
    return summary


def markdown(summary: dict[str, Any]) -> str:
    def interval(d: dict[str, float]) -> str:
        return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    ensembles = summary.get("ensembles") or []
    candidates = summary.get("candidates") or {}
    of_ensembles = (f"; an ensemble's rows are against the mean of the single weights with the same levers, "
                    f"its row \"against it alone\" against the ensemble with the levers off "
                    f"(ensembles: {', '.join(ensembles)})" if ensembles else "")
    of_ensembles += "".join(f"; {name}: the mean of {', '.join(labels)} against the single weights' mean with "
                            "the same levers" for name, labels in candidates.items())
    lines = [f"{summary['cases']} whole test cases, weights {', '.join(summary['weights'])}; differences against "
             "the baseline are per case (mean over the weights), with 95 % bootstrap intervals over cases"
             f"{of_ensembles}.\n",
             "| variant | score | Δ score [95 % CI] | higher / lower | Δ WFSS | Δ DSC_soft | Δ NAE_AC (challenge) "
             "| Δ NAE of the reported AC | frames encoded / decoded | CPU s per case (this config) "
             "| ViT-L GFLOP per case | T4 s per case (ESTIMATE) |", "|" + "---|" * 12]
    for name, e in summary["variants"].items():
        if name == "baseline":
            deltas = "– | – | – | – | – | –"
        else:
            d = e["score_difference"]
            deltas = (f"{interval(d)} | {d['higher']} / {d['lower']} | {interval(e['wfss_difference'])} "
                      f"| {interval(e['dsc_soft_difference'])} | {interval(e['nae_ac_difference'])} "
                      f"| {interval(e['reported_nae_difference'])}")
        gflop = f"{e['vit_l_gflop']:,.0f}" if "vit_l_gflop" in e else "–"
        t4 = f"{e['t4_seconds_estimate']:.1f}" if "t4_seconds_estimate" in e else "–"
        passes = (f" (x{e['encoder_passes']} / x{e['decoder_passes']} passes)"
                  if (e.get("encoder_passes", 1), e.get("decoder_passes", 1)) != (1, 1) else "")
        lines.append(f"| {name} | {e['score']:.4f} | {deltas} | {e['frames_encoded']:.0f} / {e['frames_decoded']:.0f}{passes} "
                     f"| {e['cpu_seconds']:.1f} | {gflop} | {t4} |")
    counted = summary.get("gflop_per_frame_vit_l") or {}
    architecture = f" (ViT-L/14 with the weights' {counted['decoder']} decoder)" if "decoder" in counted else ""
    lines.append(f"\nT4 seconds: the ViT-L GFLOP{architecture} at {ASSUMED_T4_FRACTION:.0%} of a T4's nominal "
                 f"{GPU_PEAK_TFLOPS['T4']:.0f} TFLOP/s fp16 (an assumed fraction: no GPU check has measured one). "
                 "A variant becomes a default only where its score interval's lower bound is above zero: "
                 + ", ".join(f"{n}: {v}" for n, v in summary["verdicts"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Each variant's paired score difference against the baseline with its 95 % interval, and its cost."""
    names = [n for n in summary["variants"] if n != "baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(names) + 1.8), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(names))[::-1]
    for row, name in zip(y, names):
        d = summary["variants"][name]["score_difference"]
        colour = "tab:green" if d["low"] > 0 else ("tab:red" if d["high"] < 0 else "0.4")
        left.errorbar(d["mean"], row, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                      color=colour, capsize=4)
    left.axvline(0.0, color="0.6", lw=1)
    left.set(yticks=y, yticklabels=names, xlabel="challenge score difference against the baseline (95 % CI)",
             title=f"{summary['cases']} whole cases; weights: {', '.join(summary['weights'])}")
    left.grid(alpha=0.3, axis="x")
    base = summary["variants"]["baseline"]

    def passes(entry: dict[str, Any]) -> float:
        return (entry["frames_encoded"] * entry.get("encoder_passes", 1)
                + entry["frames_decoded"] * entry.get("decoder_passes", 1))

    extra = [passes(summary["variants"][n]) - passes(base) for n in names]
    right.barh(y, extra, color="0.6")
    right.set(xlabel="extra network passes per case\n(encoder + decoder, per member)", title="cost")
    right.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def candidate_groups(groups: Sequence[Sequence[str]]) -> dict[str, list[Path]]:
    """`--candidate NAME W [W ...]` occurrences -> {NAME: [W, ...]}."""
    candidates: dict[str, list[Path]] = {}
    for name, *paths in groups:
        if not paths:
            raise UsageError(f"--candidate {name}: give its name, then one checkpoint per seed")
        if name in candidates or name in VARIANTS or name.startswith("ensemble "):
            raise UsageError(f"--candidate {name}: the name is taken (a variant, an ensemble or another candidate)")
        candidates[name] = [Path(path) for path in paths]
    return candidates


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training levers", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, nargs="+", required=True,
                        help="one checkpoint per training seed (.safetensors)")
    parser.add_argument("--ensemble", type=Path, nargs="+", default=[],
                        help="ensemble checkpoints of the --weights (python -m training ensemble), each compared "
                             "with the mean of the single weights (default: none)")
    parser.add_argument("--candidate", nargs="+", action="append", default=[], metavar=("NAME", "W"),
                        help="weights trained another way (a training lever, e.g. --input-frames temporal; one "
                             "checkpoint per seed), named NAME; their mean is compared with the --weights' mean "
                             "(repeatable; default: none)")
    parser.add_argument("--data", type=existing_folder, required=True,
                        help="test cases in the release layout (images, masks, circumferences.csv)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for levers.jsonl, levers.md, levers.json and levers.png")
    parser.add_argument("--device", default="cpu", help="where the network runs (default cpu)")
    parser.add_argument("--limit", type=number(int, minimum=1), default=None,
                        help="the first N cases only (default: all)")
    parser.add_argument("--shard", type=shard_argument, default=(1, 1), metavar="I/N",
                        help="every N-th case from the I-th, for N processes side by side (default 1/1: all)")
    parser.add_argument("--threads", type=number(int, minimum=1), default=None,
                        help="torch CPU threads (default: torch's own)")
    parser.add_argument("--summary-only", action="store_true",
                        help="only summarise the journal already in --out (default: run what is missing first)")
    parser.add_argument("--no-flip", action="store_true",
                        help="skip the test-time flip pass and its rows (default: run it; it is about 45 %% of a "
                             "case's CPU time in the small configuration)")
    parser.add_argument("--no-flops", action="store_true",
                        help="skip counting the full ViT-L's FLOP per frame (default: count them, ~1 GB, seconds)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def run() -> int:
        candidates = candidate_groups(args.candidate)
        every = [*args.weights, *args.ensemble, *(path for paths in candidates.values() for path in paths)]
        for path in every:
            if not path.is_file():
                raise MissingInput(f"--weights/--ensemble/--candidate {path}: no such file")
        if args.threads:
            torch.set_num_threads(args.threads)
        records = read_journal(args.out, every) if args.summary_only else \
            run_study(every, args.data, args.out, args.device, args.limit, not args.no_progress, args.shard,
                      flip=not args.no_flip)
        if not records:
            raise MissingInput(f"no records for these weights in {args.out / JOURNAL}")
        gflop = None
        if not args.no_flops:
            model = full_size_model(args.weights)
            gflop = {**per_frame_gflop(model), "decoder": model.decoder}
        labels = weights_labels(every)
        summary = summarise(records, gflop, ensembles=[labels[str(path)] for path in args.ensemble],
                            candidates={name: [labels[str(path)] for path in paths]
                                        for name, paths in candidates.items()})
        summary["gflop_per_frame_vit_l"] = gflop
        (args.out / "levers.json").write_text(json.dumps(summary, indent=2) + "\n")
        text = markdown(summary)
        (args.out / "levers.md").write_text(text)
        plot(summary, args.out / "levers.png")
        print(text, end="")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
