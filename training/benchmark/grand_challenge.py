"""Grand-challenge runner: one algorithm job per case on grand-challenge.org, through gcapi.

Written against gcapi 0.16.1 (what requirements-dev.txt installs); the calls it makes:

* `gcapi.Client(token=..., base_url=..., verify=...)`: checks the gcapi version with the site first
  (`GET gcapi/`); the base URL must be https (gcapi refuses anything else);
* `client.algorithms.detail(slug=...)`: once, to check the algorithm exists, the token may use it, and
  it has an interface with our input socket and our two outputs (`algorithm.contract`'s slugs);
* `client.start_algorithm_job(algorithm_slug=..., inputs=[SocketValueSpec(socket_slug=INPUT_SLUG,
  file=<case .mha>)])`: looks up the socket (`GET components/interfaces/`),
  uploads the file as a multipart user upload (`POST uploads/`, `PATCH .../generate-presigned-urls/`, a
  `PUT` per 32 MiB part, `PATCH .../complete-multipart-upload/`) and creates the job
  (`POST algorithms/jobs/`). (`run_external_job` and `upload_cases` of older gcapi are gone in 0.16.)
* polling `GET algorithms/jobs/<pk>/` until the status is Succeeded, Failed or Cancelled;
* `client.download_socket_value(value, output_directory=...)` for the frame-number socket, and
  `client.images.download(url=..., filename="output", image_type=ImageTypeEnum.MHD)` for the mask
  socket, so the mask lands as `contract.OUTPUT_MASK` like
  the local runner's (download_socket_value would name it `<image pk>.mha` and fetch every file of the
  image). Note: in gcapi 0.16.1 `image_type` must be the enum; the string "MHD" matches nothing.

Retries: gcapi's transport already retries 502, 503, 504, 507 and 429 (exponential back-off from 0.1 s,
up to 8 times, honouring Retry-After). On top of that every step here is retried with exponential
back-off and jitter (`RetryPolicy`) on timeouts, dropped connections and any 5xx / 429 / 408 that gets
through. Job creation is not idempotent: after a timeout or a 5xx on `POST algorithms/jobs/` the
retry may, rarely, create a second job for the case (credits spent twice, results unaffected).

Jobs in flight are bounded by `--jobs` (one worker thread per job, each polls its own job). Every job's
pk is recorded in OUT/grand-challenge-jobs.json as soon as it exists, so a resumed run re-attaches to
jobs still queued or running instead of paying for new ones; Failed / Cancelled jobs are started anew.

The token is read from GRAND_CHALLENGE_AUTHORIZATION and goes only into gcapi's Authorization header:
it is never printed, logged or written, and `redact()` scrubs it from every error message and log record
the benchmark produces (test/test_benchmark.py captures logs, output and files to check).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import quote, quote_plus

import gcapi
import httpx
from gcapi import SocketValueSpec
from gcapi.exceptions import ObjectNotFound
from gcapi.models import HyperlinkedJob, ImageTypeEnum

from algorithm.contract import FRAME_SLUG, INPUT_SLUG, MASK_SLUG
from training.data import layout

from .cases import Case, read_json, write_json_atomic

log = logging.getLogger("training.benchmark")
T = TypeVar("T")

TOKEN_ENV = "GRAND_CHALLENGE_AUTHORIZATION"
DEFAULT_BASE_URL = "https://grand-challenge.org/api/v1/"
SUCCEEDED = "Succeeded"
FAILED_STATES = ("Failed", "Cancelled")
JOBS_FILE = "grand-challenge-jobs.json"


class Stopped(Exception):
    """The run was interrupted while this case waited."""


class FatalError(RuntimeError):
    """Nothing can succeed (bad token, unknown algorithm): stop the run instead of failing every case."""


@dataclass
class RetryPolicy:
    attempts: int = 6  # tries in all, per step
    base_delay: float = 2.0  # seconds before the first retry; doubles each time
    max_delay: float = 120.0
    jitter: float = 0.25  # +- this fraction of the delay, so parallel workers do not retry in lockstep

    def delay(self, retry: int) -> float:
        base = min(self.max_delay, self.base_delay * 2 ** retry)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


def is_transient(error: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, 5xx, 429, 408."""
    if isinstance(error, httpx.HTTPStatusError):
        code = error.response.status_code
        return code >= 500 or code in (408, 425, 429)
    if isinstance(error, httpx.UnsupportedProtocol):
        return False
    return isinstance(error, (httpx.TimeoutException, httpx.TransportError))


def http_status(error: BaseException) -> int | None:
    return error.response.status_code if isinstance(error, httpx.HTTPStatusError) else None


def secret_forms(secret: str) -> list[str]:
    """Every way `secret` can show up in text: raw, escaped as Python, JSON or bytes reprs do (once or
    twice), URL-encoded, and its pieces between whitespace or control characters (a token with a line break
    is printed in halves by some libraries). Longest first, so a longer form is replaced before its parts."""
    if not secret:
        return []
    forms = {secret}
    for _ in range(2):  # a repr of a repr (an exception message quoting another) escapes twice
        for form in list(forms):
            forms.update({repr(form)[1:-1], json.dumps(form)[1:-1], repr(form.encode("utf-8"))[2:-1],
                          form.encode("unicode_escape").decode("ascii")})
    forms.update({quote(secret, safe=""), quote_plus(secret)})
    forms.update(piece for piece in re.split(r"[\s\x00-\x1f\x7f]+", secret) if len(piece) >= 6)
    return sorted((f for f in forms if f), key=len, reverse=True)


class Redactor(logging.Filter):
    """Replaces a secret, in any of its forms (`secret_forms`), in log records (message, arguments and
    traceback text) and in any text given to `__call__`."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret
        self.forms = secret_forms(secret)

    def __call__(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, "[redacted]")
        return text

    def leaks(self, text: str) -> bool:
        return any(form in text for form in self.forms)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.forms:
            message = record.getMessage()
            if self.leaks(message):
                record.msg, record.args = self(message), None
            if record.exc_info and record.exc_info[1] is not None:
                text = "".join(traceback.format_exception(*record.exc_info))
                if self.leaks(text):
                    record.exc_info, record.exc_text = None, self(text).rstrip("\n")
            elif record.exc_text and self.leaks(record.exc_text):
                record.exc_text = self(record.exc_text)
        return True


class GrandChallengeRunner:
    name = "grand-challenge"

    def __init__(self, out: Path, algorithm: str, jobs: int = 4, base_url: str = DEFAULT_BASE_URL,
                 verify: bool | str = True, poll_interval: float = 15.0, job_timeout: float = 3 * 3600,
                 http_timeout: float = 120.0, retry: RetryPolicy | None = None, token: str | None = None):
        if not algorithm:
            raise ValueError("--algorithm SLUG is required for the grand-challenge runner")
        self.out = Path(out)
        self.algorithm = algorithm
        self.parallel = max(1, jobs)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.verify = verify
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.http_timeout = http_timeout
        self.retry = retry or RetryPolicy()
        self._token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.redact = Redactor(self._token)
        self._token = self._token.strip()  # a trailing newline from `$(cat token-file)` or a copy-paste
        self.client = None
        self.stop = threading.Event()
        self._jobs_lock = threading.Lock()
        self.jobs_path = self.out / JOBS_FILE
        self.jobs: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------ plumbing

    def install_log_redaction(self) -> Callable[[], None]:
        """Add the redacting filter to every handler of the root logger; returns the undo."""
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(self.redact)
        return lambda: [handler.removeFilter(self.redact) for handler in handlers]

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() with retries on transient errors; other errors (4xx, bad data) go straight up."""
        for attempt in range(self.retry.attempts):
            if self.stop.is_set():
                raise Stopped(what)
            try:
                return fn()
            except Exception as error:  # noqa: BLE001 - classified below
                if not is_transient(error) or attempt == self.retry.attempts - 1:
                    raise
                delay = self.retry.delay(attempt)
                log.warning("%s: %s (%s); retry %d/%d in %.1f s", what, type(error).__name__,
                            self.redact(str(error))[:200], attempt + 1, self.retry.attempts - 1, delay)
                if self.stop.wait(delay):
                    raise Stopped(what) from None
        raise AssertionError("unreachable")

    def _record_job(self, uuid: str, **fields) -> None:
        with self._jobs_lock:
            entry = self.jobs.setdefault(uuid, {})
            entry.update(fields)
            write_json_atomic(self.jobs_path, self.jobs)

    # ------------------------------------------------------------------------------------ preflight

    def start(self) -> dict:
        if not self._token:
            raise FatalError(f"set {TOKEN_ENV} to a grand-challenge API token "
                             "(https://grand-challenge.org/settings/api-tokens/)")
        if re.search(r"[\s\x00-\x1f\x7f]", self._token):
            raise FatalError(f"{TOKEN_ENV} holds whitespace or a control character inside the token (a line "
                             "break from a copy-paste?); it was not sent")
        self.jobs = read_json(self.jobs_path, {}) or {}
        try:
            self.client = self._call("connect", lambda: gcapi.Client(
                token=self._token, base_url=self.base_url, verify=self.verify, timeout=self.http_timeout))
            algorithm = self._call("algorithm lookup",
                                   lambda: self.client.algorithms.detail(slug=self.algorithm))
        except ObjectNotFound:
            raise FatalError(f"algorithm '{self.algorithm}' not found on {self.base_url}, or this token "
                             "may not use it") from None
        except Exception as error:  # noqa: BLE001
            status = http_status(error)
            if status in (401, 403):
                raise FatalError(f"{self.base_url} rejected the token (HTTP {status})") from None
            raise FatalError(f"cannot reach {self.base_url}: {type(error).__name__}: "
                             f"{self.redact(str(error))[:300]}") from None
        matching = [i for i in algorithm.interfaces if {s.slug for s in i.inputs} == {INPUT_SLUG}]
        if not matching:
            found = [sorted(s.slug for s in i.inputs) for i in algorithm.interfaces]
            raise FatalError(f"algorithm '{self.algorithm}' has no interface with the single input "
                             f"'{INPUT_SLUG}' (its interfaces take {found})")
        outputs = {s.slug for s in matching[0].outputs}
        if not {MASK_SLUG, FRAME_SLUG} <= outputs:
            raise FatalError(f"algorithm '{self.algorithm}' does not output {MASK_SLUG} and {FRAME_SLUG} "
                             f"(it outputs {sorted(outputs)})")
        log.info("algorithm %s (%s) on %s, up to %d jobs at once", algorithm.title, algorithm.slug,
                 self.base_url, self.parallel)
        return {"algorithm": algorithm.slug, "algorithm_title": algorithm.title, "algorithm_url": algorithm.url,
                "base_url": self.base_url, "jobs_in_flight": self.parallel, "gcapi": version("gcapi"),
                "average_job_duration_s": algorithm.average_duration}

    # ------------------------------------------------------------------------------------ one case

    def _start_job(self, case: Case) -> str:
        job = self._call(f"{case.uuid}: upload and start job", lambda: self.client.start_algorithm_job(
            algorithm_slug=self.algorithm,
            inputs=[SocketValueSpec(socket_slug=INPUT_SLUG, file=case.image)]))
        self._record_job(case.uuid, pk=job.pk, status=job.status, created=time.time())
        log.info("%s: job %s %s", case.uuid, job.pk, job.status)
        return job.pk

    def _job(self, pk: str) -> dict:
        return self.client(method="GET", path=f"algorithms/jobs/{pk}/")

    def _wait(self, case: Case, pk: str) -> tuple[dict, int]:
        """Poll until the job ends; returns its last JSON and how many polls it took."""
        deadline = time.monotonic() + self.job_timeout
        polls, last = 0, None
        while True:
            data = self._call(f"{case.uuid}: poll job {pk}", lambda: self._job(pk))
            polls += 1
            status = data.get("status")
            if status != last:
                self._record_job(case.uuid, status=status)
                log.debug("%s: job %s %s", case.uuid, pk, status)
                last = status
            if status == SUCCEEDED or status in FAILED_STATES:
                return data, polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {pk} still '{status}' after {self.job_timeout:.0f} s "
                                   f"(it keeps running on grand-challenge; a resumed run re-attaches)")
            if self.stop.wait(self.poll_interval):
                raise Stopped(f"job {pk}")

    def _download(self, case: Case, data: dict, staging: Path) -> None:
        job = HyperlinkedJob(**data)
        outputs = {value.interface.slug: value for value in job.outputs}
        absent = [slug for slug in (MASK_SLUG, FRAME_SLUG) if slug not in outputs]
        if absent:
            raise RuntimeError(f"job {job.pk} succeeded without output(s) {absent} "
                               f"(it has {sorted(outputs)})")
        frame, mask = outputs[FRAME_SLUG], outputs[MASK_SLUG]
        if not mask.image:
            raise RuntimeError(f"job {job.pk}: {MASK_SLUG} holds no image")

        def fetch() -> None:
            for child in staging.iterdir():  # a retried download starts clean (gcapi never overwrites)
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.client.download_socket_value(frame, output_directory=staging)
            written = staging / frame.interface.relative_path
            if written != staging / layout.OUTPUT_FRAME_JSON and written.is_file():
                written.replace(staging / layout.OUTPUT_FRAME_JSON)
            files = self.client.images.download(url=str(mask.image), output_directory=staging / layout.OUTPUT_MASK_DIR,
                                                filename="output", image_type=ImageTypeEnum.MHD)
            if not files:
                raise RuntimeError(f"job {job.pk}: the {MASK_SLUG} image has no .mha file")

        self._call(f"{case.uuid}: download outputs of job {job.pk}", fetch)

    def run_case(self, case: Case, staging: Path) -> dict:
        started = time.perf_counter()
        known = self.jobs.get(case.uuid, {})
        pk, reattached = None, False
        if known.get("pk") and known.get("status") not in FAILED_STATES:
            try:
                self._call(f"{case.uuid}: look up job {known['pk']}", lambda: self._job(known["pk"]))
                pk, reattached = known["pk"], True
                log.info("%s: re-attached to job %s (%s)", case.uuid, pk, known.get("status"))
            except Exception as error:  # noqa: BLE001
                if http_status(error) != 404:
                    raise
        if pk is None:
            pk = self._start_job(case)
        created = time.perf_counter()
        data, polls = self._wait(case, pk)
        finished = time.perf_counter()
        status = data.get("status")
        if status != SUCCEEDED:
            reason = data.get("error_message") or data.get("status_message") or ""
            page = f" (logs: {data['url']})" if data.get("url") else ""
            raise RuntimeError(self.redact(f"job {pk} {status}" + (f": {reason}" if reason else "") + page))
        self._download(case, data, staging)
        done = time.perf_counter()
        self._record_job(case.uuid, downloaded=True)
        info = {"job": pk, "reattached": reattached, "polls": polls,
                "timings_s": {"upload_and_start": round(created - started, 3), "job": round(finished - created, 3),
                              "download": round(done - finished, 3), "total": round(done - started, 3)}}
        for key in ("exec_duration", "invoke_duration"):
            if data.get(key):
                info[key] = data[key]
        try:
            info["frame"] = json.loads((staging / layout.OUTPUT_FRAME_JSON).read_text())
        except (OSError, ValueError):
            pass
        return info

    def interrupt(self) -> None:
        """Stop waiting (Ctrl-C): jobs keep running on grand-challenge; a resumed run re-attaches."""
        self.stop.set()

    def close(self) -> None:
        self.stop.set()
        if self.client is not None:
            self.client.close()
