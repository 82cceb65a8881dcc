"""The invoke API server (algorithm/serve.py) outside Docker: on the loopback address, a small random
checkpoint, `/input` re-pointed between jobs as grand-challenge's shim does (a symbolic link to a fresh
folder per job)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.contract import INPUT_FOLDER, OUTPUT_FRAME, OUTPUT_MASK
from algorithm.run import EXTRAS_DIR, load, predict_case, read_case
from algorithm.serve import Service, build_server
from conftest import case_from_array

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(method: str, url: str, timeout: float = 300) -> tuple[int, dict]:
    """(status, JSON body) of one request; non-2xx statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def synthetic_case(root: Path, seed: int, frames: int = 24) -> Path:
    """A small grand-challenge style case: speckle with a bright ellipse drifting through the frames."""
    rng = np.random.default_rng(seed)
    array = rng.integers(20, 90, size=(frames, 96, 128), dtype=np.uint8)
    yy, xx = np.mgrid[:96, :128]
    for k in range(frames):
        inside = ((yy - 48) / (20 + k % 7)) ** 2 + ((xx - 60 - k) / (30 + seed)) ** 2 <= 1
        array[k][inside] = 180
    return case_from_array(root, array, name=f"case-{seed}.mha")


def point_input(link: Path, target: Path) -> None:
    """What the shim does before each job: /input becomes a symbolic link to this job's own folder."""
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


class LocalServer:
    """`build_server` run in a thread of this process (uvicorn installs no signal handlers there)."""

    def __init__(self, service: Service):
        self.service, self.port = service, free_port()
        self.server = build_server(service, self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def read_outputs(folder: Path) -> tuple[int, np.ndarray]:
    frame = json.loads((folder / OUTPUT_FRAME).read_text())
    return frame, sitk.GetArrayFromImage(sitk.ReadImage(str(folder / OUTPUT_MASK)))


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serve_cases")
    return {"a": synthetic_case(base / "a", seed=1), "b": synthetic_case(base / "b", seed=2, frames=30)}


@pytest.fixture(scope="module")
def loaded_service(tmp_path_factory, random_weights) -> Service:
    base = tmp_path_factory.mktemp("serve")
    service = Service(base / "input", base / "output", random_weights, {"device": "cpu"})
    service.load_model()
    assert service.failure is None, service.failure
    return service


# ---------------------------------------------------------------------------------------------- tests

def test_health_answers_503_while_loading_then_200(tmp_path, random_weights, cases):
    service = Service(tmp_path / "input", tmp_path / "output", random_weights, {"device": "cpu"})
    with LocalServer(service) as server:
        assert call("GET", server.url("/health")) == (503, {"status": "loading"})
        status, body = call("POST", server.url("/invoke"))
        assert status == 503 and "still loading" in body["error"]
        assert not (tmp_path / "output").exists()
        service.load_model()
        status, body = call("GET", server.url("/health"))
        assert status == 200 and body["status"] == "ready" and body["model_loads"] == 1
        assert body["weights"] == str(random_weights) and body["device"] == "cpu"


def test_two_jobs_in_a_row_match_the_run_functions_and_load_once(tmp_path, loaded_service, random_weights,
                                                                   cases):
    """Two different cases through one server, /input re-pointed per job: each output equals a fresh
    load + predict of that case (what the CLI runs), and the model was loaded once."""
    service = loaded_service
    link = service.input_dir
    network, checkpoint = load(random_weights, {"device": "cpu"})
    answers = []
    with LocalServer(service) as server:
        for name in ("a", "b"):
            point_input(link, cases[name])
            status, body = call("POST", server.url("/invoke"))
            assert status == 201, body
            answers.append(body)
            got = read_outputs(service.output_dir)
            reference = tmp_path / f"reference-{name}"
            stack, _ = read_case(cases[name])
            predict_case(network, checkpoint, stack, reference)
            want = read_outputs(reference)
            assert got[0] == want[0] == body["frame"]
            assert np.array_equal(got[1], want[1])
            assert got[1].shape == stack.shape
            result = json.loads((service.output_dir / EXTRAS_DIR / "result.json").read_text())
            assert Path(result["input"]).name == next((cases[name] / INPUT_FOLDER).iterdir()).name
        status, health = call("GET", server.url("/health"))
    assert [a["model_loads"] for a in answers] == [1, 1] and answers[0]["pid"] == answers[1]["pid"] == os.getpid()
    assert answers[1]["job"] == answers[0]["job"] + 1
    assert status == 200 and health["model_loads"] == 1 and health["jobs"] >= 2


@pytest.mark.slow
def test_the_server_matches_the_cli(tmp_path, loaded_service, random_weights, cases):
    point_input(loaded_service.input_dir, cases["a"])
    with LocalServer(loaded_service) as server:
        status, body = call("POST", server.url("/invoke"))
    assert status == 201, body
    cli = subprocess.run([sys.executable, "-m", "algorithm", "--input", str(cases["a"]), "--output",
                          str(tmp_path / "cli"), "--weights", str(random_weights), "--device", "cpu", "--quiet"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert cli.returncode == 0, cli.stderr
    got, want = read_outputs(loaded_service.output_dir), read_outputs(tmp_path / "cli")
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


def test_bad_input_is_422_with_a_one_line_reason_and_the_server_goes_on(tmp_path, loaded_service, cases):
    service = loaded_service
    broken = tmp_path / "broken"
    (broken / INPUT_FOLDER).mkdir(parents=True)
    (broken / INPUT_FOLDER / "case.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nnot an image\n")
    with LocalServer(service) as server:
        point_input(service.input_dir, cases["a"])
        assert call("POST", server.url("/invoke"))[0] == 201
        point_input(service.input_dir, broken)
        status, body = call("POST", server.url("/invoke"))
        assert status == 422 and body["exit_code"] == 2
        assert "case.mha" in body["error"] and "\n" not in body["error"]
        # A failed job leaves none of our outputs: the earlier job's are gone, not answered again.
        assert not (service.output_dir / OUTPUT_MASK).exists() and not (service.output_dir / OUTPUT_FRAME).exists()
        point_input(service.input_dir, tmp_path / "no-such-folder")
        status, body = call("POST", server.url("/invoke"))
        assert status == 422 and "does not exist" in body["error"]
        point_input(service.input_dir, cases["b"])
        status, body = call("POST", server.url("/invoke"))
        assert status == 201 and body["model_loads"] == 1


def test_stale_outputs_of_ours_are_removed_and_others_kept(tmp_path, random_weights, cases):
    service = Service(tmp_path / "input", tmp_path / "output", random_weights, {"device": "cpu"}, extras=False)
    service.load_model()
    stale = service.output_dir / EXTRAS_DIR / "result.json"
    staged = service.output_dir / OUTPUT_MASK.parent / ".output.1234abcd.partial.mha"
    foreign = service.output_dir / "someone-else.txt"
    for path in (stale, staged, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("earlier run")
    point_input(service.input_dir, cases["a"])
    with LocalServer(service) as server:
        status, body = call("POST", server.url("/invoke"))
    assert status == 201, body
    assert not stale.exists() and not staged.exists() and foreign.read_text() == "earlier run"
    assert (service.output_dir / OUTPUT_MASK).is_file() and (service.output_dir / OUTPUT_FRAME).is_file()


def test_bad_weights_health_says_so_and_invoke_answers_503(tmp_path, cases):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"\x00" * 64)
    service = Service(tmp_path / "input", tmp_path / "output", weights, {"device": "cpu"})
    service.load_model()
    point_input(service.input_dir, cases["a"])
    with LocalServer(service) as server:
        status, health = call("GET", server.url("/health"))
        assert status == 200 and health["status"] == "failed" and str(weights) in health["error"]
        status, body = call("POST", server.url("/invoke"))
    assert status == 503 and body["exit_code"] == 3 and str(weights) in body["error"]
    assert not (tmp_path / "output" / OUTPUT_MASK).exists()


def test_one_job_at_a_time_and_a_caller_that_hangs_up_abandons_its_job(tmp_path, random_weights, monkeypatch):
    service = Service(tmp_path / "input", tmp_path / "output", random_weights)
    service.loaded.set()  # a stand-in job below: no model needed
    service.network, service.checkpoint = object(), {"weights": "none"}
    started, ended = threading.Event(), threading.Event()
    reasons = []

    def long_job(job):
        started.set()
        try:
            while True:
                job.advance(1)  # what the frame search reports after every batch
                time.sleep(0.05)
        except Exception as error:
            reasons.append(str(error))
            raise
        finally:
            ended.set()

    monkeypatch.setattr(service, "run_job", long_job)
    with LocalServer(service) as server:
        caller = socket.create_connection(("127.0.0.1", server.port))
        caller.sendall(b"POST /invoke HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        assert started.wait(10)
        status, body = call("POST", server.url("/invoke"), timeout=10)
        assert status == 409 and "one job at a time" in body["error"]
        caller.close()  # the platform's time limit: its HTTP client gives up
        assert ended.wait(10), "the abandoned job kept running"
        assert reasons and "closed the connection" in reasons[0]
        deadline = time.monotonic() + 10
        while service.current is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not (tmp_path / "output" / OUTPUT_MASK).exists()


@pytest.mark.slow
def test_served_as_a_process_sigterm_ends_it_within_the_grace_period(tmp_path, random_weights, cases):
    """`python -m algorithm.serve` as the platform starts it: health polled until 200, one job, SIGTERM
    to the process group, exit well within the shim's 5 s before SIGKILL."""
    process, port, log_path = start_server(tmp_path, random_weights, cases["b"])
    try:
        body = wait_for_health(process, port, log_path)
        assert body["status"] == "ready"
        status, body = call("POST", f"http://127.0.0.1:{port}/invoke")
        assert status == 201 and body["pid"] == process.pid
        # Mid-job SIGTERM: a second job runs while the signal arrives.
        second = threading.Thread(target=lambda: call_quietly(f"http://127.0.0.1:{port}/invoke"), daemon=True)
        second.start()
        wait_for_line(log_path, "job 2: input", 60)
        stopped = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log_text = log_path.read_text()
    print(f"SIGTERM to exit: {took:.2f} s")
    assert took < 5
    assert log_text.count("weights ") == 1, log_text  # loaded once for both jobs
    assert "Traceback" not in log_text, log_text
    leftovers = [p for p in (tmp_path / "output").rglob("*partial*")]
    assert not leftovers


def test_served_with_precision_fp32_runs_in_fp32(tmp_path, random_weights, cases):
    """`python -m algorithm.serve --precision fp32`: the invoke image is told its precision on the command
    line, as the CLI is; /health and the job's result.json say which precision ran."""
    process, port, log_path = start_server(tmp_path, random_weights, cases["a"], "--precision", "fp32")
    try:
        health = wait_for_health(process, port, log_path)
        assert health["status"] == "ready" and health["precision"] == "fp32" and health["device"] == "cpu"
        status, body = call("POST", f"http://127.0.0.1:{port}/invoke")
        assert status == 201, body
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    result = json.loads((tmp_path / "output" / EXTRAS_DIR / "result.json").read_text())
    assert result["runtime"]["precision"] == "fp32" and result["search"]["precision"] == "fp32"
    assert "network: done in " in log_path.read_text()  # the job's progress is in the server's log


def start_server(tmp_path: Path, weights: Path, case: Path, *options: str) -> tuple[subprocess.Popen, int, Path]:
    """`python -m algorithm.serve` in its own process group, as the platform starts it, with `/input` pointing
    at `case`: (process, port, log file)."""
    port = free_port()
    link = tmp_path / "input"
    point_input(link, case)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "algorithm.serve", "--port", str(port), "--input",
                                    str(link), "--output", str(tmp_path / "output"), "--weights", str(weights),
                                    "--device", "cpu", *options],
                                   cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return process, port, log_path


def wait_for_health(process: subprocess.Popen, port: int, log_path: Path, seconds: float = 300) -> dict:
    """Poll GET /health as the platform does until it answers 200; its body."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log_path.read_text()
        try:
            status, body = call("GET", f"http://127.0.0.1:{port}/health", timeout=10)
            if status == 200:
                return body
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no healthy answer within {seconds} s"
        time.sleep(0.5)


def call_quietly(url: str) -> None:
    try:
        call("POST", url, timeout=60)
    except OSError:
        pass


def wait_for_line(path: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged within {seconds} s"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ the image recipe

def test_each_dockerfile_variant_has_a_label_and_an_entrypoint_that_agree():
    """The platform reads only the label; the entrypoint must start what the label announces."""
    import re

    dockerfile = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM app AS api-(\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, flags=re.M | re.S))
    assert set(stages) == {"exec", "invoke"}
    modules = {"exec": "algorithm", "invoke": "algorithm.serve"}
    for api, body in stages.items():
        assert f'LABEL org.grand-challenge.api-method="{api}"' in body
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", body, flags=re.M).group(1))
        assert entrypoint[:2] == ["dumb-init", "--single-child"] and entrypoint[-2:] == ["-m", modules[api]]
    assert re.search(r"^ARG API=exec$", dockerfile, flags=re.M)  # exec stays the default
    assert dockerfile.rstrip().endswith("FROM api-${API}")
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "algorithm/weights/" in ignored and "algorithm/**/*.safetensors" in ignored  # no weights in the image


def test_export_refuses_an_unknown_api_before_touching_docker(tmp_path):
    run = subprocess.run(["bash", str(REPO / "export.sh"), "--api", "both", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--api must be exec or invoke" in run.stderr
    assert not any(tmp_path.iterdir())
