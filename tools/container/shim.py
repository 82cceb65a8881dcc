"""Play grand-challenge's runtime shim inside the algorithm's container (run as root, as its PID 1).

    python /shim/shim.py --api exec|invoke --user 1001:1001 --jobs /shim/jobs.json --results /results \
        [--health-interval 2] [--start-timeout 300] [--job-timeout 1200] -- ENTRYPOINT... [CMD...]

What it does, after DIAGNijmegen/rse-sagemaker-shim (the platform's shim, as of its invoke support):

* the algorithm (the image's ENTRYPOINT + CMD, given after `--`) runs as the image's USER, in a new
  session, with the environment minus `GRAND_CHALLENGE_*` and HOME set to that user's home;
* before every job `/input` and `/output` are emptied, `/input` becomes a symbolic link to a fresh
  folder `/opt/ml/input/data/<pk>-input`, and the job's input files are copied there (the platform
  downloads them); the same reset follows the job;
* exec: the algorithm is started for each job and must exit 0;
  invoke: it is started once; `GET http://127.0.0.1:4743/health` is polled until it answers 200 (a
  redirect fails; connection errors and other statuses are retried every `--health-interval` seconds for
  at most `--start-timeout`), then each job is `POST /invoke` with the job's time limit, and only 201
  counts as success; at the end SIGTERM goes to the process group, SIGKILL after a 5 s grace period;
* after a successful job `/output` is "uploaded": copied to `<results>/<pk>/output`.

`--jobs` is a JSON list of {"pk": str, "source": folder holding the job's /input files}. Everything the
test checks is written to `<results>/shim.json` (per job: exit code or HTTP status and body, seconds; for
invoke: the health answers, the algorithm's process id across jobs, how long SIGTERM took). Exit status
0 when every step behaved as the platform requires (a job listed with "expect": "failure" must fail).
Standard library only: it runs with the image's own Python.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

INPUT = Path("/input")
OUTPUT = Path("/output")
LINKED_INPUT_PARENT = Path("/opt/ml/input/data")
PORT = 4743
GRACE_SECONDS = 5


def say(message: str) -> None:
    print(f"[shim] {message}", flush=True)


def clean_path(path: Path) -> None:
    """Empty a folder, following it when it is a symbolic link (as the platform's clean_path does)."""
    if not path.exists():
        return
    for entry in path.iterdir():
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)


def reset_io(pk: str) -> None:
    clean_path(INPUT)
    clean_path(OUTPUT)
    if INPUT.is_symlink():
        INPUT.unlink()
    elif INPUT.is_dir():
        INPUT.rmdir()
    linked = LINKED_INPUT_PARENT / f"{pk}-input"
    if linked.exists():
        shutil.rmtree(linked)
    linked.mkdir(parents=True)
    linked.chmod(0o755)
    INPUT.symlink_to(linked, target_is_directory=True)


def download(source: Path) -> None:
    """The job's inputs into /input (through the link), owned by root, readable by all."""
    for item in sorted(source.rglob("*")):
        target = INPUT / item.relative_to(source)
        if item.is_dir():
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            shutil.copyfile(item, target)
            target.chmod(0o644)


def upload(destination: Path) -> list[str]:
    """Copy /output to the results (what the platform uploads); returns the relative paths."""
    files = sorted(p for p in OUTPUT.rglob("*") if p.is_file() or p.is_symlink())
    for path in files:
        target = destination / path.relative_to(OUTPUT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return [str(p.relative_to(OUTPUT)) for p in files]


def capabilities(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return line.split()[1]
    except OSError:
        pass
    return "?"


class Algorithm:
    """The image's ENTRYPOINT + CMD, started as the platform starts it."""

    def __init__(self, command: list[str], user: str):
        uid, _, gid = user.partition(":")
        self.command, self.uid, self.gid = command, int(uid), int(gid or uid)
        try:
            home = pwd.getpwuid(self.uid).pw_dir
        except KeyError:
            home = None
        self.env = {k: v for k, v in os.environ.items() if not k.casefold().startswith("grand_challenge_")}
        if home:
            self.env["HOME"] = home
        self.process: subprocess.Popen | None = None

    def start(self, extra: list[str] = ()) -> subprocess.Popen:
        say(f"starting {self.command + list(extra)} as {self.uid}:{self.gid}")
        self.process = subprocess.Popen(self.command + list(extra), user=self.uid, group=self.gid, extra_groups=[],
                                        env=self.env, start_new_session=True, close_fds=True)
        return self.process

    def terminate(self) -> dict:
        """SIGTERM to the process group, SIGKILL after the grace period; how long it took."""
        process = self.process
        if process is None or process.poll() is not None:
            return {"signal": None, "exit_code": None if process is None else process.returncode}
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=GRACE_SECONDS)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = True
        seconds = round(time.monotonic() - started, 3)
        say(f"SIGTERM -> exit in {seconds} s" + (" (SIGKILLed after the grace period)" if killed else ""))
        return {"signal": "SIGTERM", "seconds": seconds, "killed": killed, "exit_code": process.returncode}


def request(method: str, path: str, timeout: float) -> tuple[int, object]:
    call = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method,
                                  data=b"" if method == "POST" else None)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(call, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode(errors="replace")[:500]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the platform treats a redirect as a failure
        return None


def wait_for_health(algorithm: Algorithm, interval: float, limit: float) -> dict:
    started = time.monotonic()
    polls = 0
    while time.monotonic() - started < limit:
        if algorithm.process.poll() is not None:
            return {"ok": False, "reason": f"the server exited with {algorithm.process.returncode} before it was healthy"}
        polls += 1
        try:
            status, body = request("GET", "/health", timeout=interval)
        except (OSError, urllib.error.URLError):
            time.sleep(interval)
            continue
        if status == 200:
            seconds = round(time.monotonic() - started, 1)
            say(f"health 200 after {seconds} s ({polls} polls): {body}")
            return {"ok": True, "seconds": seconds, "polls": polls, "body": body}
        if 300 <= status < 400:
            return {"ok": False, "reason": f"health answered a redirect ({status})"}
        time.sleep(interval)
    return {"ok": False, "reason": f"no 200 from /health within {limit} s"}


def run_job(job: dict, args, algorithm: Algorithm, results: Path) -> dict:
    pk, source = job["pk"], Path(job["source"])
    record: dict = {"pk": pk, "expect": job.get("expect", "success")}
    reset_io(pk)
    download(source)
    say(f"job {pk}: /input -> {os.readlink(INPUT)} ({sum(1 for p in INPUT.rglob('*') if p.is_file())} files)")
    started = time.monotonic()
    if args.api == "exec":
        process = algorithm.start(job.get("args", []))
        record["capabilities"] = capabilities(process.pid)
        try:
            record["exit_code"] = process.wait(timeout=args.job_timeout)
        except subprocess.TimeoutExpired:
            record["exit_code"] = None
            record["timeout"] = algorithm.terminate()
        record["success"] = record["exit_code"] == 0
    else:
        record["alive_before"] = algorithm.process.poll() is None
        try:
            status, body = request("POST", "/invoke", timeout=args.job_timeout)
        except (OSError, urllib.error.URLError) as error:
            status, body = None, f"{type(error).__name__}: {error}"
        record.update(status=status, body=body, success=status == 201)
        record["alive_after"] = algorithm.process.poll() is None
    record["seconds"] = round(time.monotonic() - started, 2)
    if record["success"]:
        record["outputs"] = upload(results / pk / "output")
    say(f"job {pk}: {'succeeded' if record['success'] else 'failed'} in {record['seconds']} s: "
        f"{record.get('status', record.get('exit_code'))} {record.get('body', '')}")
    reset_io(pk)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("exec", "invoke"), required=True)
    parser.add_argument("--user", required=True, help="uid:gid of the image's USER")
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--results-owner", default=None, help="uid:gid to give the results to")
    parser.add_argument("--health-interval", type=float, default=10.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--job-timeout", type=float, default=1200.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the image's ENTRYPOINT + CMD")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    jobs = json.loads(args.jobs.read_text())
    algorithm = Algorithm(command, args.user)
    signal.signal(signal.SIGTERM, lambda *_: (algorithm.terminate(), sys.exit(143)))

    OUTPUT.mkdir(exist_ok=True)
    OUTPUT.chmod(0o777)
    summary: dict = {"api": args.api, "command": command, "jobs": []}
    ok = True
    try:
        if args.api == "invoke":
            process = algorithm.start()
            summary["capabilities"] = capabilities(process.pid)
            summary["health"] = wait_for_health(algorithm, args.health_interval, args.start_timeout)
            ok = summary["health"]["ok"]
        if ok:
            for job in jobs:
                record = run_job(job, args, algorithm, args.results)
                summary["jobs"].append(record)
                ok &= record["success"] == (record["expect"] == "success")
        if args.api == "invoke" and algorithm.process is not None and algorithm.process.poll() is None:
            status, body = request("GET", "/health", timeout=10)
            summary["health_after"] = {"status": status, "body": body}
    finally:
        if args.api == "invoke":
            summary["shutdown"] = algorithm.terminate()
            ok &= not summary["shutdown"].get("killed", False)
        summary["ok"] = bool(ok)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "shim.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.results_owner:
            uid, _, gid = args.results_owner.partition(":")
            for path in [args.results, *args.results.rglob("*")]:
                os.chown(path, int(uid), int(gid or uid))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
