"""`python -m training benchmark`: runners, resume, failures, scoring report, Bland-Altman, gcapi end to end.

Cost: the model runs on 3 small replica cases (6 sweeps x 10 frames) for the CLI reference, the local
runner and the fake grand-challenge site, once more for the resume check, and once in the container when
a Docker engine and the image are there. Everything else uses a runner that copies outputs.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.contract import INPUT_FOLDER, INPUT_SLUG, OUTPUT_FRAME, OUTPUT_MASK, Stack, write_outputs
from training.data import layout
from training.scoring.agreement import bland_altman, plot_bland_altman
from training.benchmark.cases import discover_cases, is_complete
from training.benchmark.core import run_benchmark
from training.benchmark.docker import (DEFAULT_IMAGE, docker_run_command, engine_answers, image_exists,
                                       stage_input)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_grand_challenge import FakeGrandChallenge, Fault, algorithm_in_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BAD = "bad-case"


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(release folder = ground truth, cases folder = the 3 cases + a corrupt one, uuids of the 3)."""
    from training.data.replica import write_dataset

    base = tmp_path_factory.mktemp("benchmark_data")
    release = base / "release"
    uuids = write_dataset(release, cases=3, frames_per_sweep=10, seed=7, progress=False)
    cases = base / "cases"
    images = cases / layout.IMAGES_DIR
    images.mkdir(parents=True)
    for uuid in uuids:
        (images / f"{uuid}.mha").symlink_to(layout.image_path(release, uuid))
    (images / f"{BAD}.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nthis is not an image\n")
    return release, cases, uuids


@pytest.fixture(scope="module")
def cli_outputs(dataset, random_weights, tmp_path_factory) -> dict[str, Path]:
    """`python -m algorithm` on each case laid out as grand-challenge mounts it: the reference outputs."""
    release, _, uuids = dataset
    base = tmp_path_factory.mktemp("cli")
    outputs = {}
    for uuid in uuids:
        case_input = stage_input(layout.image_path(release, uuid), base / uuid / "input")
        output = base / uuid / "output"
        completed = subprocess.run([sys.executable, "-m", "algorithm", "--input", str(case_input), "--output",
                                    str(output), "--weights", str(random_weights), "--device", "cpu"],
                                   cwd=REPO, capture_output=True, text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr[-2000:]
        outputs[uuid] = output
    return outputs


@pytest.fixture(scope="module")
def local_run(dataset, random_weights, tmp_path_factory) -> tuple[Path, int]:
    """The local runner through the CLI on the 4 cases, scored against the release: (OUT, exit status)."""
    from training.benchmark.__main__ import main

    release, cases, _ = dataset
    out = tmp_path_factory.mktemp("local") / "out"
    status = main(["--cases", str(cases), "--out", str(out), "--ground-truth", str(release), "--weights",
                   str(random_weights), "--device", "cpu", "--no-progress", "--worst", "2"])
    return out, status


def frame_of(case_dir: Path) -> int:
    return json.loads((case_dir / OUTPUT_FRAME).read_text())


def mask_of(case_dir: Path) -> np.ndarray:
    masks = sorted((case_dir / layout.OUTPUT_MASK_DIR).glob("*.mha"))
    assert len(masks) == 1, masks
    return sitk.GetArrayFromImage(sitk.ReadImage(str(masks[0])))


class CopyRunner:
    """A runner without a model: copies outputs from `source/<uuid>/`; fails on cases it has none for."""

    name = "copy"

    def __init__(self, source: Path, parallel: int = 1, interrupt_at: int | None = None):
        self.source, self.parallel, self.interrupt_at = source, parallel, interrupt_at
        self.calls: list[str] = []

    def start(self) -> dict:
        return {}

    def run_case(self, case, staging: Path) -> dict:
        self.calls.append(case.uuid)
        if self.interrupt_at == len(self.calls):
            raise KeyboardInterrupt
        if not (self.source / case.uuid).is_dir():
            raise FileNotFoundError(f"no outputs for {case.uuid}")
        shutil.copytree(self.source / case.uuid, staging, dirs_exist_ok=True)
        return {"frame": frame_of(staging)}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ cheap units

def test_bland_altman_hand_checked():
    reference = [100, 200, 300, 400, 500, 250, None]
    predicted = [102, 199, 305, 398, 506, None, 300]  # the last two pairs are incomplete: left out
    result = bland_altman(predicted, reference)
    # d = 2, -1, 5, -2, 6: mean 2; squared deviations 0 + 9 + 9 + 16 + 16 = 50; SD = sqrt(50 / 4)
    assert result.n == 5
    assert result.bias == pytest.approx(2.0)
    assert result.sd == pytest.approx(3.5355339, abs=1e-6)
    assert result.loa_low == pytest.approx(2 - 1.96 * 3.5355339, abs=1e-6)  # -4.9296
    assert result.loa_high == pytest.approx(8.9296465, abs=1e-6)
    # t(0.975, 4) = 2.7764451: bias CI 2 +- 2.7764451 * 3.5355339 / sqrt(5); LoA CI +- 2.7764451 * sqrt(3 * 12.5 / 5)
    assert result.bias_ci == pytest.approx((2 - 4.3899441, 2 + 4.3899441), abs=1e-5)
    assert result.loa_high_ci == pytest.approx((8.9296465 - 7.6036079, 8.9296465 + 7.6036079), abs=1e-5)
    assert result.mean_abs_diff == pytest.approx(3.2)
    assert result.mean_abs_pct == pytest.approx(100 * (0.02 + 0.005 + 5 / 300 + 0.005 + 0.012) / 5)
    assert result.within_loa == 5
    assert result.diffs == pytest.approx([2, -1, 5, -2, 6])
    assert result.means == pytest.approx([101, 199.5, 302.5, 399, 503])

    single = bland_altman([110.0], [100.0])
    assert single.n == 1 and single.bias == 10.0 and np.isnan(single.sd)
    empty = bland_altman([None, float("nan")], [100.0, 120.0])
    assert empty.n == 0 and empty.to_dict()["bias"] is None
    with pytest.raises(ValueError):
        bland_altman([1.0], [1.0, 2.0])


def test_bland_altman_plot(tmp_path):
    result = plot_bland_altman([102, 199, 305], [100, 200, 300], tmp_path / "ba.png")
    picture = cv2.imread(str(tmp_path / "ba.png"))
    assert result.n == 3 and picture is not None and picture.shape[1] > 600
    plot_bland_altman([None], [None], tmp_path / "empty.png")  # no pair: still a figure, saying so
    assert cv2.imread(str(tmp_path / "empty.png")) is not None


def test_discover_cases(tmp_path, dataset):
    release, cases, uuids = dataset
    assert [c.uuid for c in discover_cases(release)] == sorted(uuids)
    assert [c.uuid for c in discover_cases(cases)] == sorted(uuids + [BAD])
    assert len(discover_cases(cases, limit=2)) == 2
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.mha", "b.nii.gz", ".hidden.mha", "notes.txt"):
        (flat / name).write_bytes(b"x")
    assert [(c.uuid, c.image.name) for c in discover_cases(flat)] == [("a", "a.mha"), ("b", "b.nii.gz")]
    (flat / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="two images for case a"):
        discover_cases(flat)
    with pytest.raises(FileNotFoundError):
        discover_cases(tmp_path / "nowhere")


def test_is_complete(tmp_path):
    case = tmp_path / "case"
    assert not is_complete(case)
    (case / layout.OUTPUT_MASK_DIR).mkdir(parents=True)
    (case / layout.OUTPUT_MASK_DIR / "output.mha").write_bytes(b"data")
    assert not is_complete(case)  # no frame number
    (case / OUTPUT_FRAME).write_text("true")
    assert not is_complete(case)  # not an integer
    (case / OUTPUT_FRAME).write_text("12")
    assert is_complete(case)
    (case / layout.OUTPUT_MASK_DIR / "second.mha").write_bytes(b"data")
    assert not is_complete(case)  # two masks


def test_docker_run_command_restrictions(tmp_path):
    command = docker_run_command("img:tag", tmp_path / "in", tmp_path / "out", tmp_volume="v1",
                                 model_dir=tmp_path / "model", memory="8g", gpus=False, name="n1",
                                 algorithm_args=["--device", "cpu"])
    joined = " ".join(command)
    for option in ("--network none", "--memory 8g", "--memory-swap 8g", "--cap-drop ALL",
                   "--security-opt no-new-privileges", "--read-only", f"{tmp_path / 'in'}:/input:ro",
                   f"{tmp_path / 'out'}:/output", "v1:/tmp", f"{tmp_path / 'model'}:/opt/ml/model:ro"):
        assert option in joined
    assert "--gpus" not in command
    assert command[-3:] == ["img:tag", "--device", "cpu"]
    assert "--gpus all" in " ".join(docker_run_command("i", tmp_path, tmp_path, tmp_volume="v", gpus=True))
    printed = subprocess.run([sys.executable, "-m", "training.benchmark.docker", "--image", "img:tag", "--input",
                              str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--tmp-volume", "v1",
                              "--model-dir", str(tmp_path / "model"), "--memory", "8g", "--name", "n1", "--",
                              "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert printed.stdout.split("\0")[:-1] == command


def test_stage_input_layout(tmp_path, dataset):
    release, _, uuids = dataset
    staged = stage_input(layout.image_path(release, uuids[0]), tmp_path / "input")
    from algorithm.contract import find_input_image

    assert find_input_image(staged).name == f"{uuids[0]}.mha"
    sockets = json.loads((staged / "inputs.json").read_text())
    assert sockets[0]["interface"]["slug"] == INPUT_SLUG
    assert sockets[0]["interface"]["relative_path"] == str(INPUT_FOLDER)


# ------------------------------------------------------------------------------------------ run loop

def test_interrupted_run_resumes_only_what_is_missing(tmp_path, dataset, cli_outputs):
    _, cases_dir, uuids = dataset
    cases = [c for c in discover_cases(cases_dir) if c.uuid != BAD]
    source = tmp_path / "source"
    for uuid, output in cli_outputs.items():
        shutil.copytree(output, source / uuid)
    out = tmp_path / "out"

    first = CopyRunner(source, interrupt_at=2)  # Ctrl-C while the second case runs
    result = run_benchmark(cases, out, first)
    assert result.interrupted and result.done == [cases[0].uuid]
    assert result.not_run == [c.uuid for c in cases[1:]]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [cases[0].uuid]
    assert not (out / ".staging").exists()
    assert json.loads((out / "run.json").read_text())["interrupted"] is True

    # A half-written case in predictions/ (frame JSON missing) and a stale staging folder are redone.
    shutil.copytree(source / cases[1].uuid, out / "predictions" / cases[1].uuid)
    (out / "predictions" / cases[1].uuid / OUTPUT_FRAME).unlink()
    (out / ".staging" / cases[2].uuid).mkdir(parents=True)
    second = CopyRunner(source)
    result = run_benchmark(cases, out, second)
    assert second.calls == [cases[1].uuid, cases[2].uuid]
    assert result.skipped == [cases[0].uuid] and result.complete
    assert all(is_complete(out / "predictions" / c.uuid) for c in cases)
    timings = json.loads((out / "timings.json").read_text())
    assert sorted(timings) == sorted(c.uuid for c in cases)  # the first run's timing is kept

    third = CopyRunner(source)
    assert run_benchmark(cases, out, third).skipped == [c.uuid for c in cases] and third.calls == []


def test_parallel_failures_and_consecutive_stop(tmp_path, dataset, cli_outputs):
    _, cases_dir, _ = dataset
    cases = discover_cases(cases_dir)  # the corrupt case has no outputs to copy: it fails
    source = tmp_path / "source"
    for uuid, output in cli_outputs.items():
        shutil.copytree(output, source / uuid)
    result = run_benchmark(cases, tmp_path / "out", CopyRunner(source, parallel=2))
    assert sorted(result.done) == sorted(cli_outputs) and [f["uuid"] for f in result.failed] == [BAD]
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert failures[0]["error_type"] == "FileNotFoundError" and BAD in failures[0]["error"]

    nothing = CopyRunner(tmp_path / "empty")
    result = run_benchmark(cases, tmp_path / "out2", nothing, max_consecutive_failures=2)
    assert len(result.failed) == 2 and len(result.not_run) == 2 and "in a row" in result.stopped_reason
    assert len(nothing.calls) == 2


# ------------------------------------------------------------------------------------------ local runner

def test_local_runner_matches_cli(local_run, cli_outputs):
    out, _ = local_run
    for uuid, reference in cli_outputs.items():
        ours = out / "predictions" / uuid
        assert frame_of(ours) == frame_of(reference)
        assert (ours / OUTPUT_MASK).read_bytes() == (reference / OUTPUT_MASK).read_bytes()
        assert np.array_equal(mask_of(ours), mask_of(reference))
        ours_summary = json.loads((ours / "fetalclipseg" / "result.json").read_text())
        cli_summary = json.loads((reference / "fetalclipseg" / "result.json").read_text())
        for key in ("frame", "plane", "ac_mm", "ellipse", "sweep_candidates", "frames_encoded", "checkpoint"):
            assert ours_summary[key] == cli_summary[key], key
        assert (ours / "fetalclipseg" / "chosen_frame.png").is_file()


def test_local_runner_records_failure_and_continues(local_run, cli_outputs):
    out, status = local_run
    assert status == 1  # one case failed
    failures = json.loads((out / "failures.json").read_text())
    assert [(f["uuid"], f["error_type"]) for f in failures] == [(BAD, "InputError")]
    assert "cannot be read as an image" in failures[0]["error"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(cli_outputs)
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(cli_outputs)
    assert all(t["timings_s"]["network"] > 0 and t["seconds"] > 0 for t in timings.values())
    run = json.loads((out / "run.json").read_text())
    assert run["done"] == 3 and run["failed"] == 1 and run["runner"] == "local"


def test_report_with_figures(local_run, cli_outputs):
    out, _ = local_run
    report = (out / "report.md").read_text()
    for heading in ("## Score", "## Abdominal circumference agreement (Bland-Altman)", "## Worst 2 case(s)",
                    "## Failures (1)", "## Timings", "## Per case"):
        assert heading in report
    assert BAD in report and "InputError" in report
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores["cases"]) == sorted(cli_outputs) and scores["no_ground_truth"] == [BAD]
    for uuid in cli_outputs:
        assert f"`{uuid}`" in report
        assert scores["cases"][uuid]["frame"] == frame_of(cli_outputs[uuid])
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "bland_altman.png" in figures and sum(name.startswith("worst_") for name in figures) == 2
    for name in figures:
        assert f"figures/{name}" in report
        assert cv2.imread(str(out / "figures" / name)) is not None


def test_resume_redoes_only_the_missing_case(local_run, dataset, random_weights, tmp_path):
    from training.benchmark.local import LocalRunner

    source, _ = local_run
    _, cases_dir, uuids = dataset
    out = tmp_path / "out"
    shutil.copytree(source, out)
    victim = sorted(uuids)[1]
    before = (out / "predictions" / victim / OUTPUT_MASK).read_bytes()
    (out / "predictions" / victim / OUTPUT_FRAME).unlink()
    runner = LocalRunner(random_weights, device="cpu")
    result = run_benchmark([c for c in discover_cases(cases_dir) if c.uuid != BAD], out, runner)
    assert runner.cases_run == 1 and result.done == [victim] and len(result.skipped) == 2
    assert (out / "predictions" / victim / OUTPUT_MASK).read_bytes() == before


def test_report_on_oracle_predictions(dataset, tmp_path):
    """Predictions copied from the ground truth: scores near 1 and a Bland-Altman table with every case."""
    from training.benchmark.report import write_report

    release, _, uuids = dataset
    out = tmp_path / "out"
    for uuid in uuids:
        image = sitk.ReadImage(str(layout.mask_path(release, uuid)))
        labels = sitk.GetArrayFromImage(image)
        kind = 1 if (labels == 1).any() else 2
        frames = np.flatnonzero((labels == kind).reshape(len(labels), -1).any(axis=1))
        frame = int(frames[np.argmax([(labels[f] == kind).sum() for f in frames])])
        stack = Stack(np.zeros_like(labels), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), Path("x"))
        write_outputs(out / "predictions" / uuid, stack, frame, (labels[frame] > 0).astype(np.uint8))
    written = write_report(out, release, uuids, cases_dir=release, worst=1, title="oracle")
    assert written["scores"]["aggregate"]["score"] > 0.9
    agreement = written["agreement"]
    assert agreement["n"] == 3 and abs(agreement["bias"]) < 10
    report = (out / "report.md").read_text()
    assert "| bias (predicted - reference) |" in report and "limit of agreement" in report
    assert "## Failures" not in report and len(list((out / "figures").glob("worst_*.png"))) == 1


# ------------------------------------------------------------------------------------------ grand-challenge

TOKEN = "gc-test-token-5f2b9c0d71e4a8"


def _gc_args(site, cases: Path, out: Path, *extra: str) -> list[str]:
    return ["--cases", str(cases), "--out", str(out), "--runner", "grand-challenge", "--algorithm", site.slug,
            "--base-url", site.base_url, "--ca-bundle", str(site.cert), "--poll-interval", "0.3",
            "--retry-delay", "0.05", "--no-progress", *extra]


def test_grand_challenge_runner_through_gcapi(dataset, random_weights, local_run, tmp_path, caplog, capsys,
                                              monkeypatch):
    """gcapi's client code end to end against the fake site: same outputs as the local runner; one 503 on a
    poll (gcapi retries), one 500 on an image lookup and one dropped connection (our retries); a corrupt
    case fails its job and is recorded; at most --jobs jobs in flight; a rerun re-attaches instead of paying
    twice; the token appears in no log, no output and no file."""
    from training.benchmark.__main__ import main

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the fake site's certificate")
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("GRAND_CHALLENGE_AUTHORIZATION", TOKEN)
    release, cases, uuids = dataset
    local_out, _ = local_run
    out = tmp_path / "out"
    faults = [Fault("GET", "/algorithms/jobs/", 503, nth=1), Fault("GET", "/cases/images/", 500, nth=1),
              Fault("GET", "/algorithms/jobs/", 0, nth=4)]
    with FakeGrandChallenge(tmp_path / "site", TOKEN, algorithm_in_process(random_weights), faults=faults,
                            job_seconds=0.5) as site:
        status = main(_gc_args(site, cases, out, "--jobs", "2", "--ground-truth", str(release)))
        assert status == 1  # the corrupt case failed
        assert all(f.fired == 1 for f in faults), [(f.path, f.status, f.fired) for f in faults]
        assert site.jobs_created == 4 and 1 <= site.max_active <= 2
        api = [r for r in site.requests if r.path.startswith("/api/v1/") and r.path != "/api/v1/gcapi/"]
        assert api and all(r.authorized for r in api)
        assert all(not r.authorized and "Authorization" not in r.headers
                   for r in site.requests if r.path.startswith(("/s3/", "/s3-media/")))
        statuses = [r.status for r in site.requests if "/algorithms/jobs/" in r.path and r.method == "GET"]
        assert statuses[:2] == [503, 200]  # gcapi's own retry of the 503

        for uuid in uuids:
            ours, local = out / "predictions" / uuid, local_out / "predictions" / uuid
            assert frame_of(ours) == frame_of(local)
            assert np.array_equal(mask_of(ours), mask_of(local))
            assert (ours / OUTPUT_MASK).read_bytes() == (local / OUTPUT_MASK).read_bytes()
        failures = json.loads((out / "failures.json").read_text())
        assert [f["uuid"] for f in failures] == [BAD] and "Failed" in failures[0]["error"]
        jobs = json.loads((out / "grand-challenge-jobs.json").read_text())
        assert set(jobs) == set(uuids) | {BAD}
        assert "## Score" in (out / "report.md").read_text()

        # Rerun with one case's outputs lost: it re-attaches to its finished job (no new job); only the
        # failed case gets a new job.
        shutil.rmtree(out / "predictions" / uuids[0])
        assert main(_gc_args(site, cases, out, "--jobs", "2")) == 1
        assert site.jobs_created == 5
        assert frame_of(out / "predictions" / uuids[0]) == frame_of(local_out / "predictions" / uuids[0])
        assert any("re-attached" in r.getMessage() for r in caplog.records)

    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err
    assert TOKEN not in caplog.text and all(TOKEN not in r.getMessage() for r in caplog.records)
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_grand_challenge_preflight_errors(dataset, tmp_path, capsys, caplog, monkeypatch):
    """A wrong token or an unknown algorithm stops the run at once (exit 2) without printing the token."""
    from training.benchmark.__main__ import main

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the fake site's certificate")
    caplog.set_level(logging.DEBUG)
    _, cases, _ = dataset
    wrong = "wrong-token-0e8a51c6d2"

    def never(input_dir, output_dir):
        raise AssertionError("no job should run")

    with FakeGrandChallenge(tmp_path / "site", TOKEN, never) as site:
        monkeypatch.setenv("GRAND_CHALLENGE_AUTHORIZATION", wrong)
        assert main(_gc_args(site, cases, tmp_path / "out1")) == 2
        assert "rejected the token (HTTP 401)" in capsys.readouterr().err
        monkeypatch.setenv("GRAND_CHALLENGE_AUTHORIZATION", TOKEN)
        args = _gc_args(site, cases, tmp_path / "out2")
        args[args.index("--algorithm") + 1] = "no-such-algorithm"
        assert main(args) == 2
        assert "algorithm 'no-such-algorithm' not found" in capsys.readouterr().err
        monkeypatch.delenv("GRAND_CHALLENGE_AUTHORIZATION")
        assert main(_gc_args(site, cases, tmp_path / "out3")) == 2
        assert "set GRAND_CHALLENGE_AUTHORIZATION" in capsys.readouterr().err
        assert site.jobs_created == 0
    assert wrong not in caplog.text and TOKEN not in caplog.text


def test_redactor_scrubs_log_records():
    from training.benchmark.grand_challenge import Redactor

    redactor = Redactor("s3cr3t")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token %s in %s", ("s3cr3t", "url"), None)
    assert redactor.filter(record) and record.getMessage() == "token [redacted] in url"
    assert redactor("a s3cr3t b") == "a [redacted] b"


# ------------------------------------------------------------------------------------------ docker

@pytest.mark.docker
def test_docker_runner_matches_local(dataset, random_weights, local_run, tmp_path):
    """One case through the built image, restricted like grand-challenge (skipped without Docker or image)."""
    from training.benchmark.__main__ import main

    if shutil.which("docker") is None or not engine_answers():
        pytest.skip("no Docker engine answers")
    if not image_exists(DEFAULT_IMAGE):
        pytest.skip(f"image {DEFAULT_IMAGE} not built (bash tools/run_container.sh)")
    release, _, uuids = dataset
    local_out, _ = local_run
    out = tmp_path / "out"
    status = main(["--cases", str(release), "--out", str(out), "--runner", "docker", "--weights",
                   str(random_weights), "--device", "cpu", "--limit", "1", "--no-progress"])
    failures = (out / "failures.json").read_text()
    if "weights do not match its config" in failures:
        pytest.skip(f"{DEFAULT_IMAGE} was built from other model code than this tree: rebuild it "
                    "(bash tools/run_container.sh)")
    assert status == 0, failures
    uuid = sorted(uuids)[0]
    assert frame_of(out / "predictions" / uuid) == frame_of(local_out / "predictions" / uuid)
    assert np.array_equal(mask_of(out / "predictions" / uuid), mask_of(local_out / "predictions" / uuid))
    assert (out / "logs" / f"{uuid}.log").is_file()
    assert not (out / ".docker-input").exists() and not (out / ".docker-model").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert timings[uuid]["timings_s"]["container"] > 0
