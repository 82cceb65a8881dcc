"""Several `reproduce` runs side by side: challenge score per run and mode, and per test case, paired.

    python -m training compare runs/rank4 runs/rank8 ac=runs/ac all=runs/all --out runs/compare

Each RUN is a `reproduce --out` folder (`LABEL=RUN` names its rows; default: the folder's name); every mode it
trained is a row. Challenge metrics of whole test cases are comparable between runs that share their test
cases; frame-level F1 is not when the populations differ (`--all-sweeps` adds whole sweeps of negatives to the
test frames), so the table says which population each row's frames come from. Per test case the rows are
paired: the first row is the reference, and each other row gets its mean difference and how many cases it
scores higher, the same or lower. Output: `comparison.md`, `comparison.json` and `comparison.png` (the
score of every common test case, one marker per row).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.cli import CommandParser
from training.models.modes import format_parameters
from training.scoring.report_plots import plt, save_figure

TIE = 1e-9


def parse_run(text: str) -> tuple[str, Path]:
    """`LABEL=PATH` or `PATH` (label: the folder's name)."""
    label, sep, path = text.partition("=")
    return (label, Path(path)) if sep and label else (Path(text).name, Path(text))


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (not a finished `reproduce` output?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object `reproduce` writes")
    return value


def read_run(label: str, run: Path) -> list[dict[str, Any]]:
    """One row per trained mode of a `reproduce` output folder."""
    summary = read_json(run / "reproduce.json")
    rows = []
    for mode, entry in summary.get("modes", {}).items():
        config = read_json(run / mode / "summary.json").get("config", {}) if (run / mode / "summary.json").is_file() \
            else {}
        challenge_file = run / mode / "challenge" / "challenge.json"
        cases = read_json(challenge_file).get("cases", {}) if challenge_file.is_file() else {}
        frames = entry.get("test_mean_std") or {}
        rows.append({
            "row": f"{label} / {mode}" if len(summary["modes"]) > 1 else label,
            "run": str(run), "mode": mode,
            "population": "all sweeps" if summary.get("all_sweeps") else "AC sweeps",
            "decoder": config.get("decoder") or ("–" if mode in ("paper-cls", "probe", "baseline") else "default"),
            "epochs": config.get("epochs"), "trainable": (entry.get("parameters") or {}).get("trainable"),
            "challenge": entry.get("challenge"),
            "f1_mask": (frames.get("mask_rule") or {}).get("f1"), "f1_head": (frames.get("head") or {}).get("f1"),
            "cases": {uuid: case.get("score") for uuid, case in cases.items()},
        })
    if not rows:
        raise ValueError(f"{run / 'reproduce.json'} lists no trained modes")
    return rows


def paired(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per common test case every row's score; each row against the first (mean difference, higher/same/lower)."""
    scored = [r for r in rows if r["cases"]]
    common = sorted(set.intersection(*(set(r["cases"]) for r in scored))) if scored else []
    if not common:
        return {"cases": [], "scores": {}, "against_reference": {}}
    scores = {r["row"]: [float(r["cases"][c]) for c in common] for r in scored}
    reference = scored[0]["row"]
    against = {}
    for name, values in scores.items():
        if name == reference:
            continue
        diff = np.asarray(values) - np.asarray(scores[reference])
        against[name] = {"mean_difference": float(diff.mean()), "higher": int((diff > TIE).sum()),
                         "same": int((np.abs(diff) <= TIE).sum()), "lower": int((diff < -TIE).sum())}
    return {"cases": common, "reference": reference, "scores": scores, "against_reference": against}


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return f"{value['mean']:{spec}} ± {value['std']:{spec}}" if value.get("std") else f"{value['mean']:{spec}}"
    return f"{value:{spec}}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict[str, Any]], pairs: dict[str, Any]) -> str:
    lines = ["| row | population | decoder | epochs | trainable | score | WFSS | DSC_soft | NAE_AC | test cases "
             "| frame F1, mask rule | frame F1, head |", "|" + "---|" * 12]
    for r in rows:
        c = r["challenge"] or {}
        lines.append(f"| {r['row']} | {r['population']} | {r['decoder']} | {_fmt(r['epochs'])} "
                     f"| {format_parameters(r['trainable'])} "
                     f"| {_fmt(c.get('score'))} | {_fmt(c.get('wfss'))} | {_fmt(c.get('dsc_soft'))} "
                     f"| {_fmt(c.get('nae_ac'))} | {_fmt(c.get('n_cases'))} | {_fmt(r['f1_mask'])} | {_fmt(r['f1_head'])} |")
    lines.append("\nFrame F1 is measured on each row's own test frames (its population); the challenge columns on "
                 "whole test cases.\n")
    if pairs["cases"]:
        names = list(pairs["scores"])
        lines += [f"Per test case ({len(pairs['cases'])} cases common to every row), challenge score:\n",
                  "| case | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for i, case in enumerate(pairs["cases"]):
            lines.append(f"| {case[:8]} | " + " | ".join(f"{pairs['scores'][n][i]:.3f}" for n in names) + " |")
        lines.append("| mean | " + " | ".join(f"{np.mean(pairs['scores'][n]):.3f}" for n in names) + " |")
        lines.append(f"\nAgainst {pairs['reference']}, paired over those cases:\n")
        lines += ["| row | mean difference | cases higher | same | lower |", "|---|---|---|---|---|"]
        for name, d in pairs["against_reference"].items():
            lines.append(f"| {name} | {d['mean_difference']:+.3f} | {d['higher']} | {d['same']} | {d['lower']} |")
    else:
        lines.append("No test case is common to every row with a challenge score: no per-case comparison.")
    return "\n".join(lines) + "\n"


def plot(pairs: dict[str, Any], path: Path, title: str = "") -> Path:
    names, cases = list(pairs["scores"]), pairs["cases"]
    order = np.argsort([-np.mean([pairs["scores"][n][i] for n in names]) for i in range(len(cases))], kind="stable")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cases) + 3) + 2.5, 4.5))
    x = np.arange(len(cases))
    spread = np.linspace(-0.25, 0.25, len(names)) if len(names) > 1 else np.zeros(1)
    for k, name in enumerate(names):
        values = np.asarray(pairs["scores"][name])[order]
        ax.plot(x + spread[k], values, "o", ms=7, label=f"{name} (mean {values.mean():.3f})")
    for i in range(len(cases)):
        ax.plot(i + spread, [pairs["scores"][n][order[i]] for n in names], color="0.7", lw=0.8, zorder=0)
    ax.set_xticks(x, [cases[i][:8] for i in order], rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="challenge score", ylim=(-0.03, 1.03), xlabel="test case",
           title=title or "challenge score per test case")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def compare(runs: Sequence[str], out: Path, title: str = "") -> dict[str, Any]:
    rows = [row for text in runs for row in read_run(*parse_run(text))]
    names = [r["row"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"two rows are named alike ({', '.join(names)}): name the runs with LABEL=RUN")
    pairs = paired(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "paired": pairs}
    (out / "comparison.md").write_text(markdown(rows, pairs))
    if pairs["cases"]:
        result["plot"] = str(plot(pairs, out / "comparison.png", title))
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a `reproduce --out` folder, or LABEL=FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="folder for the comparison (JSON, table, plot)")
    parser.add_argument("--title", default="", help="title of the table and the plot (default: none)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.runs, args.out, args.title)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result["rows"], result["paired"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
