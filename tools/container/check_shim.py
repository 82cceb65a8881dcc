"""Check what tools/container/shim.py recorded for one container (`<results>/shim.json`).

    python tools/container/check_shim.py --results DIR [--log CONTAINER_LOG] [--grace 5]

Both APIs: every job succeeded or failed as listed (a job expected to fail is bad input: exit code 2 in
exec mode, HTTP 422 with a one-line JSON `error` and `exit_code` 2 in invoke mode), and the algorithm ran
without any capability. Invoke: /health answered 200 before the first job, the same server process
answered every job and was alive before and after each, it loaded the model once (each 201 body and the
final /health say `model_loads` 1; the container log has one `weights ...` line), and SIGTERM ended it
within the grace period. Exec: the log has one `weights ...` line per job that got that far.
Prints one line per job; exit status 1 on any failure (all listed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--log", type=Path, help="the container's log (model loads are counted in it)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds SIGTERM may take (the platform's)")
    args = parser.parse_args(argv)
    summary = json.loads((args.results / "shim.json").read_text())
    api, jobs = summary["api"], summary["jobs"]
    failures: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            failures.append(message)

    check(summary.get("ok") is True, "the shim reported a failure")
    if api == "invoke":
        health = summary.get("health", {})
        check(health.get("ok") is True, f"no healthy server: {health.get('reason')}")
        check(summary.get("capabilities") == "0000000000000000",
              f"the server runs with capabilities {summary.get('capabilities')}")
    check(len(jobs) > 0, "no job ran")
    successes = 0
    server_pid = (summary.get("health", {}).get("body") or {}).get("pid") if api == "invoke" else None
    for job in jobs:
        expected = job["expect"] == "success"
        check(job["success"] == expected, f"job {job['pk']}: {'failed' if expected else 'succeeded'} "
              f"({job.get('status', job.get('exit_code'))} {job.get('body', '')})")
        if api == "exec":
            check(job.get("capabilities") == "0000000000000000",
                  f"job {job['pk']}: the algorithm ran with capabilities {job.get('capabilities')}")
            if not expected:
                check(job.get("exit_code") == 2, f"job {job['pk']}: bad input gave exit code {job.get('exit_code')}, "
                      "expected 2")
        else:
            body = job.get("body") if isinstance(job.get("body"), dict) else {}
            check(job.get("alive_before") and job.get("alive_after"), f"job {job['pk']}: the server was not "
                  "running before and after the job")
            if expected and job["success"]:
                successes += 1
                check(body.get("model_loads") == 1, f"job {job['pk']}: model_loads {body.get('model_loads')}, "
                      "expected 1 (the model must be loaded once, at start-up)")
                check(body.get("pid") == server_pid, f"job {job['pk']}: answered by process {body.get('pid')}, "
                      f"not the one that answered the first /health ({server_pid})")
            if not expected:
                error = str(body.get("error", ""))
                check(job.get("status") == 422 and body.get("exit_code") == 2,
                      f"job {job['pk']}: bad input answered {job.get('status')} {body}, expected 422 with exit_code 2")
                check(bool(error) and "\n" not in error, f"job {job['pk']}: the reason is not one line: {error!r}")
        print(f"[check] job {job['pk']} ({job['expect']}): "
              f"{job.get('status', job.get('exit_code'))} in {job['seconds']} s")
    if api == "invoke":
        after = summary.get("health_after", {})
        body = after.get("body") if isinstance(after.get("body"), dict) else {}
        check(after.get("status") == 200 and body.get("model_loads") == 1 and body.get("jobs") == len(jobs),
              f"/health after the jobs: {after}")
        shutdown = summary.get("shutdown", {})
        check(not shutdown.get("killed") and shutdown.get("seconds", args.grace) < args.grace,
              f"SIGTERM did not end the server within {args.grace} s: {shutdown}")
        print(f"[check] invoke: health 200 after {summary.get('health', {}).get('seconds')} s; "
              f"{successes} jobs answered by one process; SIGTERM -> exit in {shutdown.get('seconds')} s")
    if args.log is not None:
        loads = sum(1 for line in args.log.read_text(errors="replace").splitlines() if " INFO weights " in line)
        wanted = 1 if api == "invoke" else sum(1 for job in jobs if job["success"])
        check(loads == wanted, f"the log shows {loads} model loads, expected {wanted}")
    if failures:
        for failure in failures:
            print(f"[check]   - {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
