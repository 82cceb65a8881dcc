"""Docker runner: the built submission image, one `docker run` per case, the way grand-challenge runs it.

Each case is staged as grand-challenge mounts /input (the image in its socket's folder plus an `inputs.json`
naming the socket: `training.data.layout.stage_case`) and run with the restrictions of tools/run_container.sh:
no network, read-only /input, read-only root file system with a fresh /tmp volume, a memory limit, all capabilities
dropped, no-new-privileges, the image's own non-root user, `--gpus all` only where `nvidia-smi` works,
and the weights (when given) mounted read-only at /opt/ml/model like grand-challenge's model tarball.

`docker_run_command` is the one place that spells out those `docker run` options. The container test can
use the same list instead of repeating it in bash:

    mapfile -d '' -t cmd < <("$PY" -m training.benchmark.docker --image "$IMAGE" --input "$case_dir/input" \
        --output "$out" --tmp-volume "$name-tmp" --model-dir "$MODEL_DIR" --memory "$MEMORY" --name "$name" \
        ${GPU_ARGS:+--gpus} -- "$@")
    timeout --kill-after=30 "$CASE_TIMEOUT" "${cmd[@]}"

(prints the command NUL-separated; imports nothing heavy). The image tag defaults to the container
test's `acouslic-fetalclipseg:test`; export.sh builds `acouslic-fetalclipseg:latest`.

Limits: the paths are bind-mounted, so the Docker engine must see this machine's file system (not a
remote engine, not docker-in-docker without the same mounts). Outputs are written by the image's user
(uid 1001); as root they are prepared with chown, otherwise the staging folder is made world-writable.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

from algorithm.contract import INPUT_FOLDER, INPUTS_JSON
from algorithm.weights_location import resolve_weights
from training.data.layout import stage_case

from . import DEFAULT_IMAGE
from .cases import Case

log = logging.getLogger("training.benchmark")
DEFAULT_MEMORY = "15g"


def docker_run_command(image: str, input_dir: Path, output_dir: Path, *, tmp_volume: str,
                       model_dir: Path | None = None, memory: str = DEFAULT_MEMORY, gpus: bool = False,
                       name: str | None = None, algorithm_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`docker run ...` for one case, restricted like a grand-challenge algorithm job."""
    command = ["docker", "run", "--rm"]
    if name:
        command += ["--name", name]
    command += ["--network", "none"]
    if gpus:
        command += ["--gpus", "all"]
    command += ["--memory", memory, "--memory-swap", memory,
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--read-only",
                "--volume", f"{Path(input_dir).resolve()}:/input:ro",
                "--volume", f"{Path(output_dir).resolve()}:/output",
                "--volume", f"{tmp_volume}:/tmp"]
    if model_dir is not None:
        command += ["--volume", f"{Path(model_dir).resolve()}:/opt/ml/model:ro"]
    return command + [image, *algorithm_args]


def stage_input(image: Path, input_dir: Path) -> Path:
    """Lay one image out as grand-challenge mounts /input, readable by any user; returns `input_dir`."""
    readable = os.stat(image).st_mode & 0o004
    target = stage_case(image, input_dir, how="link" if readable else "copy")
    if not readable or target.stat().st_ino != os.stat(image).st_ino:
        target.chmod(0o644)
    for path in (input_dir, input_dir / INPUT_FOLDER.parent, target.parent):
        path.chmod(0o755)
    (input_dir / INPUTS_JSON).chmod(0o644)
    return input_dir


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def engine_answers() -> bool:
    try:
        return _docker("info", timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def image_exists(image: str) -> bool:
    try:
        return _docker("image", "inspect", image, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def gpu_available() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _tail_error(log_text: str) -> str:
    """The algorithm's one-line 'error: ...' if it printed one, else the last non-empty log line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:500]


class DockerRunner:
    name = "docker"

    def __init__(self, out: Path, image: str = DEFAULT_IMAGE, weights: Path | None = None, device: str = "auto",
                 jobs: int = 1, memory: str = DEFAULT_MEMORY, case_timeout: float = 1200,
                 gpus: bool | None = None, algorithm_args: list[str] | None = None):
        self.out = Path(out)
        self.image = image
        self.weights = weights
        self.device = device
        self.parallel = max(1, jobs)
        self.memory = memory
        self.case_timeout = case_timeout
        self.gpus = gpus
        self.algorithm_args = list(algorithm_args or [])
        self.model_dir: Path | None = None
        self.user: tuple[int, int] | None = None
        self.logs = self.out / "logs"
        self.inputs = self.out / ".docker-input"

    def start(self) -> dict:
        if shutil.which("docker") is None or not engine_answers():
            raise RuntimeError("no Docker engine answers (`docker info` failed)")
        if not image_exists(self.image):
            raise RuntimeError(f"image {self.image} not found: build it (tools/run_container.sh or ./export.sh)")
        if self.gpus is None:
            self.gpus = gpu_available()
        user = _docker("run", "--rm", "--network", "none", "--entrypoint", "id", self.image, "-u").stdout.strip()
        group = _docker("run", "--rm", "--network", "none", "--entrypoint", "id", self.image, "-g").stdout.strip()
        if user.isdigit() and group.isdigit():
            self.user = (int(user), int(group))
        if self.weights is not None:
            weights = resolve_weights(self.weights)
            self.model_dir = self.out / ".docker-model"
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir.mkdir(parents=True)
            shutil.copyfile(weights, self.model_dir / weights.name)
            self.model_dir.chmod(0o755)
            (self.model_dir / weights.name).chmod(0o644)  # save_checkpoint writes 0600; uid 1001 must read it
        if self.device != "auto":
            self.algorithm_args += ["--device", self.device]
        self.logs.mkdir(parents=True, exist_ok=True)
        image_id = _docker("image", "inspect", "-f", "{{.Id}}", self.image).stdout.strip()
        log.info("image %s (%s), user %s, gpus %s, weights %s", self.image, image_id[:19], self.user, self.gpus,
                 self.model_dir or "bundled in the image")
        return {"image": self.image, "image_id": image_id, "user": self.user, "gpus": self.gpus,
                "memory": self.memory, "weights": str(self.weights) if self.weights else "bundled in the image",
                "algorithm_args": self.algorithm_args}

    def _prepare_output(self, staging: Path) -> None:
        if os.geteuid() == 0 and self.user is not None:
            os.chown(staging, *self.user)
        else:
            staging.chmod(0o777)

    def run_case(self, case: Case, staging: Path) -> dict:
        started = time.perf_counter()
        name = f"acouslic-bench-{os.getpid()}-{uuidlib.uuid4().hex[:8]}"
        input_dir = stage_input(case.image, self.inputs / case.uuid / "input")
        self._prepare_output(staging)
        volume = f"{name}-tmp"
        _docker("volume", "create", volume)
        command = docker_run_command(self.image, input_dir, staging, tmp_volume=volume, model_dir=self.model_dir,
                                     memory=self.memory, gpus=bool(self.gpus), name=name,
                                     algorithm_args=self.algorithm_args)
        log_path = self.logs / f"{case.uuid}.log"
        status: int | str
        try:
            with open(log_path, "w") as log_file:
                status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT,
                                        timeout=self.case_timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _docker("rm", "-f", name)
            _docker("volume", "rm", "-f", volume)
            shutil.rmtree(self.inputs / case.uuid, ignore_errors=True)
        seconds = time.perf_counter() - started
        log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if status == "timeout":
            raise RuntimeError(f"container ran longer than {self.case_timeout:.0f} s (killed)")
        if status != 0:
            hint = " (killed: memory limit?)" if status == 137 else ""
            raise RuntimeError(f"container exited with status {status}{hint}: {_tail_error(log_text)}")
        result_json = staging / "fetalclipseg" / "result.json"
        info: dict = {"timings_s": {"container": round(seconds, 3)}}
        try:
            summary = json.loads(result_json.read_text())
            info.update(frame=summary.get("frame"), ac_mm=summary.get("ac_mm"), plane=summary.get("plane"))
            info["timings_s"].update({f"in_container_{k}": v for k, v in summary.get("timings_s", {}).items()})
        except (OSError, ValueError):
            pass
        return info

    def close(self) -> None:
        shutil.rmtree(self.inputs, ignore_errors=True)
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Print the `docker run` command (NUL-separated) for one case: for scripts that share the options."""
    parser = argparse.ArgumentParser(prog="python -m training.benchmark.docker",
                                     description="print the restricted `docker run` command, NUL-separated")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--tmp-volume", required=True)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--memory", default=DEFAULT_MEMORY)
    parser.add_argument("--gpus", action="store_true")
    parser.add_argument("--name")
    parser.add_argument("algorithm_args", nargs="*", help="after --: arguments for python -m algorithm")
    args = parser.parse_args(argv)
    command = docker_run_command(args.image, args.input, args.output, tmp_volume=args.tmp_volume,
                                 model_dir=args.model_dir, memory=args.memory, gpus=args.gpus, name=args.name,
                                 algorithm_args=args.algorithm_args)
    sys.stdout.write("\0".join(command) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
