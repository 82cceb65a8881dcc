"""The run loop shared by the runners: resume, progress, failures, timings.

A runner has `name`, `parallel` (cases at once), `start() -> dict` (load the model / check the image /
check the site; may raise to stop the run before any case), `run_case(case, staging) -> dict` (write the
case's outputs into `staging`, laid out like /output; raise on failure), `close()`, and optionally
`upcoming(case)` (a hint for read-ahead), `interrupt()` (stop waiting) and `redact(text)` (scrub secrets
from error messages).

Files written under OUT (all JSON is written atomically, after every case, so a crash loses nothing):
  failures.json  the cases that failed in the latest run: [{uuid, image, error, error_type, seconds}]
  timings.json   {uuid: {runner, seconds, finished, ...runner details}} for every case ever completed
  run.json       settings and counts of the latest run
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .cases import Case, OutputTree, read_json, write_json_atomic

log = logging.getLogger("training.benchmark")

FAILURES = "failures.json"
TIMINGS = "timings.json"
RUN = "run.json"


@dataclass
class RunResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # left after an interruption or a stop
    interrupted: bool = False
    stopped_reason: str = ""
    wall_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed and not self.not_run and not self.interrupted


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Progress:
    """A rich progress bar when wanted, and one log line per case either way."""

    def __init__(self, total: int, runner: str, enabled: bool, console=None):
        self.total, self.count, self.failed = total, 0, 0
        self.bar = None
        if enabled and total:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(f"benchmark ({runner})", total=total, failed=0)
            self.bar.start()

    def advance(self, uuid: str, ok: bool, seconds: float, note: str) -> None:
        self.count += 1
        self.failed += 0 if ok else 1
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "[%d/%d] %s %s in %.1f s%s", self.count, self.total, uuid, "done" if ok else "FAILED",
                seconds, f": {note}" if note else "")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_benchmark(cases: list[Case], out: Path, runner: Any, *, progress: bool = False, console=None,
                  max_consecutive_failures: int = 10, settings: dict | None = None,
                  on_case: Callable[[str, bool], None] | None = None) -> RunResult:
    """Run every case of `cases` whose outputs are not complete yet; see the module docstring."""
    out = Path(out)
    tree = OutputTree(out)
    out.mkdir(parents=True, exist_ok=True)
    tree.clean_staging()  # leftovers of an interrupted run: those cases are redone
    redact: Callable[[str], str] = getattr(runner, "redact", None) or (lambda text: text)
    result = RunResult()
    todo: list[Case] = []
    for case in cases:
        if tree.done(case.uuid):
            result.skipped.append(case.uuid)
        else:
            todo.append(case)
    if result.skipped:
        log.info("resuming: %d case(s) already complete, %d to run", len(result.skipped), len(todo))

    timings: dict = read_json(out / TIMINGS, {}) or {}
    run_info: dict[str, Any] = {"runner": runner.name, "started": _now(), "cases": len(cases),
                                "to_run": len(todo), "already_complete": len(result.skipped),
                                **(settings or {})}
    started = time.perf_counter()
    consecutive = 0

    def save() -> None:
        write_json_atomic(out / FAILURES, result.failed)
        write_json_atomic(out / TIMINGS, timings)
        run_info.update(done=len(result.done), failed=len(result.failed), not_run=len(result.not_run),
                        interrupted=result.interrupted, stopped_reason=result.stopped_reason,
                        wall_s=round(time.perf_counter() - started, 3), finished=_now())
        write_json_atomic(out / RUN, run_info)

    def one(case: Case) -> tuple[Case, bool, float, Any]:
        staging = tree.staging(case.uuid)
        t0 = time.perf_counter()
        try:
            info = runner.run_case(case, staging)
            tree.commit(case.uuid, staging)
            return case, True, time.perf_counter() - t0, info
        except Exception as error:  # noqa: BLE001 - one case's failure must not stop the others
            tree.discard(case.uuid)
            return case, False, time.perf_counter() - t0, error
        except BaseException:
            tree.discard(case.uuid)
            raise

    def record(case: Case, ok: bool, seconds: float, info: Any) -> None:
        nonlocal consecutive
        if ok:
            consecutive = 0
            result.done.append(case.uuid)
            timings[case.uuid] = {"runner": runner.name, "seconds": round(seconds, 3), "finished": _now(),
                                  **(info or {})}
            note = f"frame {info.get('frame')}" if isinstance(info, dict) and "frame" in info else ""
        else:
            consecutive += 1
            message = redact(str(info)) or type(info).__name__
            result.failed.append({"uuid": case.uuid, "image": str(case.image), "runner": runner.name,
                                  "error_type": type(info).__name__, "error": message,
                                  "seconds": round(seconds, 3), "when": _now()})
            note = message[:300]
        progress_bar.advance(case.uuid, ok, seconds, note)
        save()
        if on_case is not None:
            on_case(case.uuid, ok)
        if max_consecutive_failures and consecutive >= max_consecutive_failures and not result.stopped_reason:
            result.stopped_reason = (f"{consecutive} cases in a row failed (last: {note}); stopped so as not "
                                     "to fail the rest the same way")
            log.error("%s", result.stopped_reason)

    progress_bar = _Progress(len(todo), runner.name, progress, console)
    try:
        run_info["runner_info"] = runner.start()
        save()
        if getattr(runner, "parallel", 1) <= 1:
            for index, case in enumerate(todo):
                if result.stopped_reason:
                    result.not_run = [c.uuid for c in todo[index:]]
                    break
                if index + 1 < len(todo) and hasattr(runner, "upcoming"):
                    runner.upcoming(todo[index + 1])
                try:
                    record(*one(case))
                except KeyboardInterrupt:
                    result.interrupted = True
                    result.not_run = [c.uuid for c in todo[index:]]
                    break
        else:
            _run_parallel(todo, runner, one, record, result)
    finally:
        progress_bar.close()
        try:
            runner.close()
        finally:
            result.wall_s = time.perf_counter() - started
            tree.clean_staging()
            save()
    return result


def _run_parallel(todo: list[Case], runner: Any, one, record, result: RunResult) -> None:
    """Up to `runner.parallel` cases at once; results are recorded in the main thread as they finish."""
    pending = list(reversed(todo))
    running: dict[Future, Case] = {}
    with ThreadPoolExecutor(max_workers=runner.parallel, thread_name_prefix=runner.name) as pool:
        try:
            while pending or running:
                while pending and len(running) < runner.parallel and not result.stopped_reason:
                    case = pending.pop()
                    running[pool.submit(one, case)] = case
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    record(*future.result())
        except KeyboardInterrupt:
            result.interrupted = True
            if hasattr(runner, "interrupt"):
                runner.interrupt()
            log.warning("interrupted: waiting for %d case(s) in flight to stop", len(running))
            for future in list(running):
                try:
                    case, ok, seconds, info = future.result()
                    if ok:
                        record(case, ok, seconds, info)
                        running.pop(future)
                except BaseException:  # noqa: BLE001
                    pass
        result.not_run = [case.uuid for case in list(running.values()) + list(reversed(pending))
                          if case.uuid not in result.done]
