"""Recipes that chain the training steps: `reproduce` (the paper's experiments) and `demo-weights`.

`reproduce` = prepare (once, on rank 0; reused when every parameter of its content matches) -> train each
mode (under torchrun with DDP) -> the paper's frame-level table with parameter counts beside the paper's ->
the threshold sweep of the mask-size rule -> the algorithm on every whole test case and the challenge score
(training.scoring.evaluate), on rank 0 -> one Markdown report.

`demo-weights` makes the bundled CPU demo weights: a replica dataset, prepared, the small configuration
trained from scratch on the CPU (all encoder weights trainable), saved as a checkpoint with the provenance
"replica-trained demo weights, not for clinical use". `--check` then runs `python -m algorithm` on fresh
replica cases (seed 424242, never used for training) and scores them with `python -m training evaluate`.

The recipe fits a small CPU: a training step's cost is almost all the decoder's convolutions at 224 px, so
it spends decoder passes where they teach most:
* 60 cases of 48 frames per sweep (not 140): the same number of annotated runs per case, fewer
  near-duplicate frames to generate, store and read; more cases = more abdomen shapes and backgrounds;
* all sweeps prepared (`--all-sweeps`), so negatives include the skulls, bones and lift-off frames of the
  sweeps without an abdomen, which a whole-case run must reject;
* per epoch every positive frame (once, augmented online), 0.75 decoded negatives per positive, and 4
  head-only negatives per positive (encoder + frame head, no decoder: a fraction of the cost), see
  `training.data.sampling.MixedBatches`;
* batch 8, AdamW 1e-3 with 50 warm-up steps (a from-scratch network, not LoRA on a pretrained one),
  Dice + cross-entropy for the mask, bf16 autocast where the CPU has bf16 units, one torch thread, NHWC;
* 42 epochs, the one with the lowest validation loss kept (validation: 160 frames, positives first): the
  frame head of a from-scratch encoder learns long after the mask is usable.
* optionally (`--mine-epochs N`, off by default) N more epochs of hard-negative mining (training.data.mining)
  from the best of those weights, AdamW 3e-4, half of every negative draw taken from the negatives the
  frame head still calls abdomen, again keeping the epoch with the lowest validation loss. Off by default
  because it fixed the acceptance cases at the cost of other replica cases (docs/notes/demo-weights.md).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from algorithm.contract import INPUT_FOLDER, read_stack
from algorithm.model.checkpoint import load_checkpoint, save_checkpoint
from algorithm.run import load, process_case
from algorithm.runtime import choose_precision
from training.cli import CommandParser, MissingInput, UsageError, existing_folder, number, run_command
from training.data import layout
from training.data.dataset import read_manifest
from training.data.prepare import describe, prepare, prepare_key, prepared_matches
from training.data.replica import MIN_FRAMES_PER_SWEEP, write_dataset
from training.models.modes import (FETALCLIP_MODES, FORMER_NAMES, mode_argument, model_config_for,
                                   parameters_table)
from training.params import (COUNT, POSITIVE, TrainConfig, add_recipe_arguments, add_sampling_arguments,
                             add_schedule_arguments, check_device, check_fetalclip, recipe_from_args, recipe_groups,
                             sampling_from_args, schedule_from_args)
from training.run.distributed import DistContext, setup_distributed, shutdown
from training.run.ensemble import ENSEMBLE_NAME, build_ensemble
from training.run.train import CHECKPOINT_NAME, configure_logging, result_rows, summarise, train
from training.scoring.evaluate import evaluate
from training.scoring.evaluate_frames import markdown_table
from training.scoring.threshold_sweep import markdown as sweep_markdown, run as run_sweep

log = logging.getLogger("training")

REPO = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO / "algorithm" / "weights" / "fetalclipseg_small_replica.safetensors"
DEMO_PROVENANCE = "replica-trained demo weights, not for clinical use"
CHECK_SEED = 424242  # the acceptance cases; never a training seed
MAX_DEMO_BYTES = 20 * 1024 * 1024



# ------------------------------------------------------------------------------------------ whole cases

def predict_cases(weights: Path, data: Path, uuids: Sequence[str], out: Path, device: str = "auto",
                  overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """The algorithm on whole cases of a release-layout folder, in process (one model load), written in the
    grand-challenge output layout: out/<uuid>/{contract.OUTPUT_MASK, contract.OUTPUT_FRAME}."""
    network, checkpoint = load(weights, {"device": device, **(overrides or {})})
    timings = {}
    for uuid in tqdm(uuids, desc="test cases", unit="case", disable=not progress):
        started = time.perf_counter()
        stack = read_stack(layout.image_path(data, uuid))
        result, _ = process_case(network, checkpoint, stack, out / uuid, extras=False)
        (out / uuid / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
        timings[uuid] = round(time.perf_counter() - started, 1)
    return {"checkpoint": checkpoint, "seconds_per_case": timings}


def ground_truth_view(data: Path, uuids: Sequence[str], folder: Path) -> Path:
    """A release-layout folder holding only `uuids` (symlinks, filtered CSV): training.scoring.evaluate scores every
    case it finds, so the test split needs a folder of its own."""
    if folder.exists():
        shutil.rmtree(folder)
    for sub, path_of in ((layout.IMAGES_DIR, layout.image_path), (layout.MASKS_DIR, layout.mask_path)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for uuid in uuids:
            source = path_of(data, uuid)
            if source.is_file():
                os.symlink(source.resolve(), folder / sub / source.name)
    source_csv = data / layout.CIRCUMFERENCES_CSV
    if source_csv.is_file():
        (folder / layout.CIRCUMFERENCES_CSV).parent.mkdir(parents=True, exist_ok=True)
        with source_csv.open(newline="") as src, (folder / layout.CIRCUMFERENCES_CSV).open("w", newline="") as dst:
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=reader.fieldnames, lineterminator="\n")
            writer.writeheader()
            writer.writerows(row for row in reader if row["uuid"] in set(uuids))
    return folder


def challenge_score(weights: Path, data: Path, uuids: Sequence[str], out: Path, device: str = "auto",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict whole cases and score them with training.scoring.evaluate; returns its report (+ timings)."""
    predictions = out / "predictions"
    run = predict_cases(weights, data, uuids, predictions, device, overrides)
    report = evaluate(predictions, ground_truth_view(data, uuids, out / "ground_truth"))
    report["inference"] = run
    (out / "challenge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------------------ reproduce

def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def challenge_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | score | WFSS | DSC_soft | NAE_AC | HD (mm) | cases |", "|---|---|---|---|---|---|---|"]
    for name, agg in rows.items():
        lines.append(f"| {name} | {_fmt(agg.get('score'))} | {_fmt(agg.get('wfss'))} | {_fmt(agg.get('dsc_soft'))} "
                     f"| {_fmt(agg.get('nae_ac'))} | {_fmt(agg.get('hd'))} | {agg.get('n_cases', '–')} |")
    return "\n".join(lines) + "\n"

def reproduce_runs(args: argparse.Namespace, prepared: Path) -> list[tuple[str, Any]]:
    """(report name, TrainConfig) of every mode and baseline `reproduce` trains, in order."""
    recipe = recipe_from_args(args)
    # --train-encoder (default for the small config without FetalCLIP weights) replaces LoRA in our mode only:
    # the other modes reproduce published set-ups whatever the encoder's start.
    train_encoder = args.train_encoder or (args.config == "small" and recipe["fetalclip"] is None)
    runs = []
    for mode in dict.fromkeys(args.modes):
        changes = dict(train_encoder=train_encoder and mode == "fixed",
                       decoder=args.decoder if mode == "fixed" else None)
        runs.append((mode, TrainConfig(prepared=prepared, out=args.out / mode, mode=mode,
                                       **{**recipe, **changes})))
    for name in args.baselines or []:
        pretrained = recipe["pretrained"]
        if getattr(args, "baseline_weights", None):
            found = [p for p in sorted(Path(args.baseline_weights).glob(f"{name}.*")) if p.is_file()]
            if not found:
                raise MissingInput(f"no weights for baseline {name} in {args.baseline_weights} "
                                   f"(expected {name}.safetensors or {name}.pth)")
            pretrained = str(found[0])
        runs.append((f"baseline-{name}", TrainConfig(prepared=prepared, out=args.out / f"baseline-{name}",
                                                     mode="baseline", backbone=name,
                                                     **{**recipe, "train_encoder": False, "decoder": None,
                                                        "pretrained": pretrained})))
    return runs


def prepare_once(args: argparse.Namespace, prepared: Path, ctx) -> dict:
    """Rank 0 prepares (or reuses a preparation made with the same key); the other ranks wait."""
    if ctx.main:
        key = prepare_key(args.data, args.seed, args.all_sweeps, replica=args.replica)
        if prepared_matches(prepared, key):
            log.info("reusing prepared data in %s (same data files and parameters)", prepared)
        else:
            if (prepared / "manifest.json").is_file():
                log.info("prepared data in %s was made from other files or parameters: preparing again", prepared)
            prepare(args.data, prepared, seed=args.seed, all_sweeps=args.all_sweeps, replica=args.replica)
    ctx.barrier()
    return read_manifest(prepared)


def trials_ensemble(args: argparse.Namespace, run: Path, manifest: dict) -> dict[str, Any]:
    """The run's trials as one ensemble checkpoint (`run`/ENSEMBLE_NAME), with its challenge score unless
    `--skip-cases`.

    For modes whose encoder never trains: started from the same weights (FetalCLIP) their trials share it, so
    the ensemble costs one encoder pass plus a decoder per trial; on the replica it beat its members
    (docs/levers.md). A randomly initialised encoder differs per trial, and the members are stored whole."""
    written = build_ensemble([run], run / ENSEMBLE_NAME)
    log.info("ensemble of the %d trials: %s (%s)", written["members"], written["out"],
             "one shared encoder" if written["shared_encoder"] else "whole members: the encoders differ")
    if not args.skip_cases:
        written["challenge"] = challenge_score(Path(written["out"]), args.data, manifest["splits"]["test"],
                                               run / "challenge_ensemble", args.device)["aggregate"]
    return written


def reproduce(args: argparse.Namespace) -> int:
    """Every step of the reproduction. Its folder holds what each step completed (prepared data, run folders,
    a stopped run's finished epochs); one this command made and that holds nothing when it stops is removed."""
    ctx = setup_distributed(args.device)
    out: Path = args.out
    made = ctx.main and not out.exists()
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _reproduce(args, ctx)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _reproduce(args: argparse.Namespace, ctx: DistContext) -> int:
    out: Path = args.out
    prepared = args.prepared or out / "prepared"
    manifest = prepare_once(args, prepared, ctx)
    if ctx.main:
        log.info("splits:\n%s", describe(manifest))
    runs = reproduce_runs(args, prepared)
    summaries = {name: train(cfg) for name, cfg in runs}  # every rank trains (DDP under torchrun)
    if not ctx.main:
        return 0

    frame_rows: dict[str, dict[str, Any]] = {}
    challenge_rows: dict[str, dict[str, Any]] = {}
    sweeps: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {"data": str(args.data), "prepared": str(prepared), "world_size": ctx.world,
                               "all_sweeps": manifest.get("all_sweeps", False), "modes": {}}
    for (name, cfg), summary in zip(runs, summaries.values()):
        trials = summary["trials"]
        spec = cfg.spec
        label = spec.label if spec.name != "baseline" else f"baseline {cfg.backbone}"
        frame_rows.update(result_rows(label, trials, summarise(trials)))
        counts[name] = {"trainable": trials[0]["trainable_parameters"],
                        "effective": trials[0]["effective_trainable_parameters"],
                        "paper": trials[0]["paper_parameters"]}
        entry: dict[str, Any] = {"checkpoint": summary["checkpoint"], "test_mean_std": summary["test_mean_std"],
                                 "parameters": counts[name], "precision": trials[0]["precision"],
                                 "memory": trials[0]["memory"]}
        if spec.segments:
            files = [t["test_frames"] for t in trials if t.get("test_frames")]
            if files:
                sweep = run_sweep(files, out / name / "threshold_sweep", f"{label}, test split")
                entry["threshold_sweep"] = {"best": sweep["best"], "paper": sweep["paper_threshold"],
                                            "plot": sweep["plot"]}
                sweeps.append(sweep_markdown(sweep, label))
            if not args.skip_cases:
                report = challenge_score(Path(summary["checkpoint"]), args.data, manifest["splits"]["test"],
                                         out / name / "challenge", args.device)
                challenge_rows[label] = report["aggregate"]
                entry["challenge"] = report["aggregate"]
            if model_config_for(cfg).encoder_no_grad and len(trials) > 1:
                entry["ensemble"] = ensemble = trials_ensemble(args, out / name, manifest)
                if "challenge" in ensemble:
                    challenge_rows[f"{label}, ensemble of {ensemble['members']} trials"] = ensemble["challenge"]
        results["modes"][name] = entry

    population = ("every frame of all six sweeps (`--all-sweeps`)" if manifest.get("all_sweeps") else
                  "the frames of the sweeps with a reference AC, as published")
    text = [f"# FetalCLIPSEG reproduction ({args.config} configuration)\n",
            f"Data: `{args.data}` ({'replica, not for clinical use' if manifest.get('replica') else 'release'}); "
            f"split by subject, seed {manifest['seed']}: " +
            ", ".join(f"{s} {c['cases']} cases / {c['frames']} frames" for s, c in manifest["counts"].items()) + ".\n",
            f"Population of the frame tables and of training: {population}. The challenge table runs the "
            "algorithm on every frame of the whole test cases.\n",
            f"Training: {args.epochs} epoch(s) of the training frames plus {args.augment_copies} augmented "
            f"cop{'y' if args.augment_copies == 1 else 'ies'} each, batch {args.batch_size}, AdamW {args.lr:g}, "
            f"{args.trials} trial(s) (mean ± std), {ctx.world} process(es); precision "
            f"{summaries[runs[0][0]]['trials'][0]['precision']}; encoder "
            f"{'from FetalCLIP weights' if runs[0][1].fetalclip else 'randomly initialised'}"
            f"{'; max ' + str(args.max_steps) + ' steps' if args.max_steps else ''}.\n",
            "## Parameters\n", parameters_table(counts),
            "\n## Frame level (test split; positive = annotated frame)\n", markdown_table(frame_rows)]
    if sweeps:
        text += ["\n## Threshold of the mask-size rule (test split)\n", *sweeps]
    if challenge_rows:
        text += ["\n## Challenge metrics (whole test cases through `algorithm`)\n", challenge_table(challenge_rows)]
    ensembles = {name: entry["ensemble"] for name, entry in results["modes"].items() if "ensemble" in entry}
    if ensembles:
        text += ["\n## Ensembles of the trials (`./export.sh -w` takes them as any checkpoint)\n"] + [
            f"- {name}: `{e['out']}`, {e['members']} members, "
            f"{'one shared encoder' if e['shared_encoder'] else 'whole members'}, "
            f"{e['bytes'] / 2**20:.1f} MiB" for name, e in ensembles.items()]
    (out / "report.md").write_text("\n".join(text))
    (out / "reproduce.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(text))
    print(f"report: {out / 'report.md'}")
    return 0


# ------------------------------------------------------------------------------------------ demo weights

def cli_case_folder(data: Path, uuid: str, folder: Path) -> Path:
    """A grand-challenge /input folder for one release case (made once): a hard link to the release's image, or a
    copy across file systems."""
    if not (folder / INPUT_FOLDER / f"{uuid}.mha").exists():
        layout.stage_case(layout.image_path(data, uuid), folder, how="link")
    return folder


def check_weights(weights: Path, work: Path, cases: int = 4, seed: int = CHECK_SEED,
                  frames_per_sweep: int = 140, device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """The acceptance check: replica cases (seed 424242), `python -m algorithm` on each through its CLI,
    then `python -m training evaluate`. Returns the evaluation report."""
    data = work / f"check_{seed}"
    if not (data / layout.CIRCUMFERENCES_CSV).is_file():
        write_dataset(data, cases, frames_per_sweep, seed)
    uuids = layout.list_case_ids(data)
    predictions = work / "check_predictions"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    timings = {}
    for uuid in uuids:
        case = cli_case_folder(data, uuid, work / "check_inputs" / uuid)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "algorithm", "--input", str(case), "--output", str(predictions / uuid),
                        "--weights", str(weights), "--device", device], check=True, cwd=REPO, env=env)
        timings[uuid] = round(time.perf_counter() - started, 1)
    report = evaluate(predictions, data)
    report["seconds_per_case"] = timings
    (work / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def demo_weights(args: argparse.Namespace) -> int:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = work / "replica"
    if not (data / layout.CIRCUMFERENCES_CSV).is_file():
        write_dataset(data, args.cases, args.frames_per_sweep, args.seed)
    prepared = work / "prepared"
    if not (prepared / "manifest.json").is_file():
        prepare(data, prepared, seed=args.seed, all_sweeps=True, fractions=args.fractions, replica=True)
    manifest = json.loads((prepared / "manifest.json").read_text())
    log.info("demo data:\n%s", describe(manifest))
    data_seconds = time.perf_counter() - started

    # auto: bf16 autocast where the CPU has bf16 units (AMX / AVX512-BF16: half the CPU time), else fp32
    precision = choose_precision(args.precision, "cpu")
    # The demo recipe: our decoder, every frame once per epoch (augmented online), whatever the defaults.
    cfg = TrainConfig(prepared=prepared, out=work / "train", mode="fixed", config="small", train_encoder=True,
                      decoder="unetr", augment_copies=0, device="cpu", precision=precision, mask_ce_weight=1.0,
                      replica=True, **schedule_from_args(args), **sampling_from_args(args))
    summary = train(cfg)
    final = work / "train" / CHECKPOINT_NAME
    epochs = f"{summary['trials'][0]['epochs_trained']} epochs"
    if args.mine_epochs:
        # Stage 2: fine-tune the stage-1 weights with hard-negative mining (training.data.mining), with a fresh
        # optimiser and its own best epoch by validation loss.
        mined = dataclasses.replace(cfg, out=work / "mine", init=final, epochs=args.mine_epochs, lr=args.mine_lr,
                                    hard_negatives=args.hard_negatives, hard_negatives_from=0)
        summary = train(mined)
        final = work / "mine" / CHECKPOINT_NAME
        epochs += (f" + {summary['trials'][0]['epochs_trained']} epochs of hard-negative mining "
                   f"({args.hard_negatives:g} of the negatives, lr {args.mine_lr:g})")
    train_seconds = time.perf_counter() - started - data_seconds

    # Re-save with the demo provenance (and fp16 only if fp32 would not fit the size limit).
    model, info = load_checkpoint(final, device="cpu")
    provenance = (f"{DEMO_PROVENANCE}: FetalCLIPSEG small configuration, encoder trained from scratch, "
                  f"{args.cases} replica cases (seed {args.seed}, {args.frames_per_sweep} frames per sweep), "
                  f"{epochs} on CPU; `python -m training demo-weights`")
    extra = dict(info.extra, demo_command=" ".join(["python -m training demo-weights"] + (args.argv or [])),
                 data_seconds=round(data_seconds, 1), train_seconds=round(train_seconds, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, model, model.config, provenance, extra=extra)
    size = args.out.stat().st_size
    if size > MAX_DEMO_BYTES:
        model = model.half()
        save_checkpoint(args.out, model, dataclasses.replace(model.config), provenance,
                        extra={**extra, "dtype": "float16"})
        size = args.out.stat().st_size
    log.info("demo weights: %s (%.1f MB), data %.0f s, training %.0f s", args.out, size / 2**20, data_seconds,
             train_seconds)
    if size > MAX_DEMO_BYTES:
        raise SystemExit(f"{args.out} is {size / 2**20:.1f} MB, over the 20 MB limit")
    result = {"weights": str(args.out), "bytes": size, "data_seconds": round(data_seconds, 1),
              "train_seconds": round(train_seconds, 1), "test_frame_metrics": summary["trials"][0].get("test")}
    if args.check:
        report = check_weights(args.out, work, args.check_cases, CHECK_SEED, device="cpu", threads=args.threads)
        result["check"] = report["aggregate"]
        log.info("check on %d replica cases (seed %d): score %.3f", args.check_cases, CHECK_SEED,
                 report["aggregate"]["score"])
    (work / "demo_weights.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ commands

def reproduce_parser() -> argparse.ArgumentParser:
    rep = CommandParser(prog="python -m training reproduce", usage="%(prog)s --data DIR --out DIR [options]",
                        description="prepare -> train every mode -> frame table, threshold sweep -> challenge "
                                    "score -> report")
    rep.add_argument("--data", type=existing_folder, required=True, help="release-layout folder (real or replica)")
    rep.add_argument("--out", type=Path, required=True,
                     help="the reproduction's folder: prepared data, one run folder per mode, report.md")
    rep.add_argument("--prepared", type=Path, help="reuse / write prepared data here (default: OUT/prepared)")
    rep.add_argument("--modes", nargs="+", default=list(FETALCLIP_MODES), type=mode_argument,
                     choices=FETALCLIP_MODES, help=f"the modes to train, in order; {FORMER_NAMES}")
    rep.add_argument("--baselines", nargs="+", metavar="NAME",
                     help="also train these baselines (training.models.baselines: densenet, swin, clip_openai, ... "
                          "or a timm name); weights from --pretrained hub, or NAME.safetensors / NAME.pth in "
                          "--baseline-weights (default: none)")
    rep.add_argument("--baseline-weights", type=existing_folder,
                     help="folder of local baseline weights, one file per name (default: none)")
    rep.add_argument("--all-sweeps", action="store_true", help="prepare every sweep, not only those with an AC")
    rep.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                     help="the data is the replica (default: detected)")
    rep.add_argument("--skip-cases", action="store_true", help="no whole-case inference / challenge score")
    add_recipe_arguments(recipe_groups(rep))
    rep.set_defaults(trials=5)  # the paper's five trials
    return rep


def demo_weights_parser() -> argparse.ArgumentParser:
    """The shared schedule and sampling options with the demo recipe's defaults, plus its own."""
    demo = CommandParser(prog="python -m training demo-weights",
                         description="train the bundled small replica weights on the CPU (the small configuration "
                                     "from scratch: no FetalCLIP weights)")
    demo.add_argument("--out", type=Path, default=DEMO_WEIGHTS, help="the weights file to write")
    demo.add_argument("--work", type=Path, default=REPO / "build" / "demo_weights",
                      help="working folder: replica data, prepared frames, runs (reused when present)")
    demo.add_argument("--cases", type=POSITIVE, default=60, help="replica cases to train on")
    demo.add_argument("--frames-per-sweep", type=number(int, minimum=MIN_FRAMES_PER_SWEEP), default=48,
                      help="frames per sweep of each replica case")
    demo.add_argument("--fractions", type=number(float, minimum=0), nargs=3, default=(0.85, 0.1, 0.05),
                      metavar=("TRAIN", "VAL", "TEST"), help="shares of the cases per split")
    add_schedule_arguments(demo)
    add_sampling_arguments(demo)
    demo.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                      help="auto: bf16 on CPUs with bf16 units, else fp32")
    demo.add_argument("--mine-epochs", type=COUNT, default=0,
                      help="then fine-tune this many epochs with hard-negative mining (0: none)")
    demo.add_argument("--hard-negatives", type=number(float, minimum=0, maximum=1), default=0.5,
                      help="stage 2: fraction of the negatives drawn by the frame head's P(abdomen)")
    demo.add_argument("--mine-lr", type=number(float, above=0), default=3e-4, help="stage 2: AdamW learning rate")
    demo.add_argument("--check", action="store_true",
                      help=f"then score the weights on replica cases of seed {CHECK_SEED}")
    demo.add_argument("--check-cases", type=POSITIVE, default=4, help="replica cases the check scores")
    # one torch thread: on a CPU shared with other jobs it did the work of two for a third of the CPU time
    demo.set_defaults(seed=2025, epochs=42, batch_size=8, lr=1e-3, warmup_steps=50, threads=1,
                      negatives_per_positive=0.75, head_negatives_per_positive=4.0, val_max_frames=160)
    return demo


def reproduce_main(argv: Sequence[str] | None = None) -> int:
    """`python -m training reproduce` (also under torchrun); exit codes as every training command."""
    configure_logging()
    args = reproduce_parser().parse_args(argv)
    return run_command(lambda: _recipe_command(reproduce, args))


def demo_weights_main(argv: Sequence[str] | None = None) -> int:
    """`python -m training demo-weights`."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = demo_weights_parser().parse_args(argv)
    args.argv = argv
    return run_command(lambda: _recipe_command(demo_weights, args))


def _recipe_command(recipe, args: argparse.Namespace) -> int:
    """Refuse what cannot work before anything starts; shut the process group down however the recipe ends."""
    if recipe is reproduce:
        check_fetalclip(args, args.modes)
    elif args.seed == CHECK_SEED:
        raise UsageError(f"--seed {CHECK_SEED} makes the acceptance cases; train on another seed")
    check_device(getattr(args, "device", "cpu"), args.precision)
    try:
        return recipe(args)
    finally:
        shutdown()
