"""`python -m algorithm.serve`: grand-challenge's invoke API, the model loaded once for many jobs.

An image labelled `org.grand-challenge.api-method=invoke` is started once. The platform polls
`GET /health` until it answers 200, then for every job points `/input` at a fresh folder holding that
job's inputs, calls `POST /invoke` and expects 201 once `/output` holds the outputs; any other status fails
the job. At the end it sends SIGTERM and, 5 s later, SIGKILL.

Here `/health` answers 503 while the model loads and 200 once loading is over. If the weights cannot be
loaded, the body of `/health` says so and every `/invoke` answers 503 with the reason: the platform then
fails each job at once with our message, instead of after its five-minute health timeout.

`/invoke` runs one case exactly as `python -m algorithm` does (the same `algorithm.run` functions, so the
same bytes), reading `/input` afresh and first removing outputs of ours that an earlier job left in
`/output`. Success is 201 with a short JSON summary; failure is a JSON body whose `error` is the CLI's
one-line message, with the CLI's exit code beside it: 422 bad input, 503 bad weights or shutting down, 409
another job still running, 500 anything else. One job runs at a time; a job whose caller hangs up (the
platform's time limit) is abandoned at the next batch and writes nothing. The server listens on
127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import __version__
from .contract import check_writable, output_lock, remove_outputs
from .errors import AlgorithmError, DeviceUnavailable, InputError, OutputError, WeightsError
from .options import (InferenceOverrides, add_inference_options, add_output_options, add_weights_option,
                      inference_overrides, program_name)
from .progress import LoggedProgress
from .run import load, predict_case, read_case
from .weights_location import resolve_weights

log = logging.getLogger("algorithm")

HOST = "127.0.0.1"
PORT = 4743  # the port grand-challenge's shim calls; it cannot tell us another one (it strips its variables)
# HTTP status of each failure, by the CLI's exit code (errors.py).
STATUS_BY_EXIT_CODE = {InputError.exit_code: 422, WeightsError.exit_code: 503, OutputError.exit_code: 500,
                       DeviceUnavailable.exit_code: 503}


class JobCancelled(Exception):
    """The job was abandoned (its caller hung up, or the server is stopping) before it wrote anything."""


@dataclass
class Job(LoggedProgress):
    """One POST /invoke and its progress lines; `cancel` makes its next progress report raise `JobCancelled`."""

    number: int
    started: float = field(default_factory=time.perf_counter)
    reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.warning("job %d: abandoning it (%s)", self.number, reason)

    def check(self) -> None:
        if self.reason is not None:
            raise JobCancelled(self.reason)

    def advance(self, frames: int) -> None:
        self.check()  # after every batch: an abandoned job stops there


@dataclass
class Failure:
    """A job's or the start-up's failure, as the CLI would report it."""

    status: int
    message: str
    exit_code: int

    def response(self, **extra) -> JSONResponse:
        return JSONResponse({"error": self.message, "exit_code": self.exit_code, **extra}, status_code=self.status)


def failure_of(error: BaseException) -> Failure:
    """HTTP status, one-line message and CLI exit code of whatever ended a job or the model's loading."""
    if isinstance(error, AlgorithmError):
        return Failure(STATUS_BY_EXIT_CODE.get(error.exit_code, 500), str(error), error.exit_code)
    if isinstance(error, JobCancelled):
        return Failure(503, f"job abandoned: {error}", 1)
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return Failure(500, f"internal error: {type(error).__name__}: {first_line}", 1)


class Service:
    """The loaded model and the jobs run on it; the HTTP layer (`create_app`) only translates."""

    def __init__(self, input_dir: Path, output_dir: Path, weights: Path | None = None,
                 overrides: InferenceOverrides | None = None, extras: bool = True):
        self.input_dir, self.output_dir = Path(input_dir), Path(output_dir)
        self.weights, self.overrides, self.extras = weights, InferenceOverrides(**(overrides or {})), extras
        self.network = self.checkpoint = None
        self.failure: Failure | None = None
        self.loaded = threading.Event()  # set when loading is over, successfully or not
        self.model_loads = 0
        self.jobs = 0
        self.current: Job | None = None
        self.busy = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ model
    def load_model(self) -> None:
        """Load the weights once (called in a thread at start-up; `/health` answers 503 until it returns)."""
        started = time.perf_counter()
        try:
            weights = resolve_weights(self.weights)
            self.network, self.checkpoint = load(weights, self.overrides)
            self.model_loads += 1
            log.info("model loaded in %.1f s: ready for jobs", time.perf_counter() - started)
        except BaseException as error:  # noqa: BLE001 - every failure must reach /health and /invoke
            # Whatever the cause, no job can run: 503 (service unavailable) for every /invoke.
            self.failure = Failure(503, failure_of(error).message, failure_of(error).exit_code)
            if isinstance(error, AlgorithmError):
                print(f"error: {error}", file=sys.stderr, flush=True)
            else:
                log.exception("loading the model failed")
            log.error("every /invoke will answer %d: %s", self.failure.status, self.failure.message)
        finally:
            self.loaded.set()

    def health(self) -> tuple[int, dict]:
        if not self.loaded.is_set():
            return 503, {"status": "loading"}
        if self.failure is not None:
            return 200, {"status": "failed", "error": self.failure.message, "exit_code": self.failure.exit_code}
        return 200, {"status": "ready", "model_loads": self.model_loads, "jobs": self.jobs, "pid": os.getpid(),
                     "device": str(self.network.device), "precision": self.network.precision,
                     "batch_size": self.network.batch_size, "weights": self.checkpoint["weights"],
                     "version": __version__}

    # ------------------------------------------------------------------------------------------- jobs
    def clear_outputs(self) -> None:
        """Remove outputs of ours left by an earlier job, so a failing job never leaves the last one's."""
        with output_lock(self.output_dir):
            remove_outputs(self.output_dir)

    def run_job(self, job: Job) -> dict:
        """One case from the current `/input` into `/output` (called in the job's thread)."""
        check_writable(self.output_dir)
        self.clear_outputs()
        log.info("job %d: input %s", job.number, self.input_dir.resolve())
        stack, read_seconds = read_case(self.input_dir)
        job.check()
        summary = predict_case(self.network, self.checkpoint, stack, self.output_dir, extras=self.extras,
                               progress=job, timings={"read": read_seconds}, started=job.started)
        return {"frame": summary["frame"], "ac_mm": summary.get("ac_mm"), "plane": summary.get("plane"),
                "seconds": summary["timings_s"]["total"]}

    def stop(self) -> None:
        """The server is stopping: abandon the running job at its next batch."""
        if self.current is not None:
            self.current.cancel("the server is shutting down")

    async def invoke(self, request: Request) -> JSONResponse:
        if not self.loaded.is_set():
            return Failure(503, "the model is still loading: wait for GET /health to answer 200", 1).response()
        if self.failure is not None:
            return self.failure.response()
        if self.busy.locked() and self.current is not None and not self.current.cancelled:
            return Failure(409, f"job {self.current.number} is still running; the invoke API takes one job at a "
                           "time", 1).response()
        async with self.busy:  # waits only for an abandoned job to wind down
            self.jobs += 1
            job = self.current = Job(self.jobs)
            try:
                result = await self._run_in_thread(job, request)
            except BaseException as error:  # noqa: BLE001 - reported as a status, never as a traceback page
                if isinstance(error, asyncio.CancelledError):
                    job.cancel("the request was cancelled")
                    raise
                failure = failure_of(error)
                if isinstance(error, (AlgorithmError, JobCancelled)):
                    print(f"error: {failure.message}", file=sys.stderr, flush=True)
                else:
                    log.error("job %d: unexpected error", job.number, exc_info=error)
                log.info("job %d: failed with %d after %.1f s", job.number, failure.status,
                         time.perf_counter() - job.started)
                return failure.response(job=job.number)
            finally:
                self.current = None
        log.info("job %d: done (201) in %.1f s; model loaded %d time(s) since start-up", job.number,
                 time.perf_counter() - job.started, self.model_loads)
        return JSONResponse({**result, "job": job.number, "model_loads": self.model_loads, "pid": os.getpid()},
                            status_code=201)

    async def _run_in_thread(self, job: Job, request: Request) -> dict:
        """Run the job in a daemon thread (a stopping server never waits for it) and abandon it when the
        caller hangs up, which is how the platform's time limit shows."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future = loop.create_future()

        def settle(outcome: BaseException | dict) -> None:
            if not finished.done():
                (finished.set_exception if isinstance(outcome, BaseException) else finished.set_result)(outcome)

        def work() -> None:
            try:
                outcome: BaseException | dict = self.run_job(job)
            except BaseException as error:  # noqa: BLE001 - handed to the event loop
                outcome = error
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop has closed: the server stopped meanwhile
                pass

        threading.Thread(target=work, name=f"job-{job.number}", daemon=True).start()
        try:
            while True:
                done, _ = await asyncio.wait({finished}, timeout=0.5)
                if done:
                    return finished.result()
                if not job.cancelled and await request.is_disconnected():
                    job.cancel("the caller closed the connection (time limit?)")
        except asyncio.CancelledError:
            job.cancel("the request was cancelled")
            raise


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="FetalCLIPSEG invoke API", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.post("/invoke")
    async def invoke(request: Request) -> JSONResponse:
        return await service.invoke(request)

    return app


class Server(uvicorn.Server):
    """uvicorn's server, which also abandons the running job when SIGTERM / SIGINT arrive."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        log.info("signal %d: shutting down", sig)
        self.service.stop()
        super().handle_exit(sig, frame)


def build_server(service: Service, port: int = PORT) -> Server:
    """The HTTP server on the loopback address only; uvicorn logs through our logging set-up, without
    a line per request (the platform polls /health every 10 s)."""
    config = uvicorn.Config(create_app(service), host=HOST, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=1, lifespan="off")
    return Server(config, service)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m algorithm.serve"),
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"), help="case folder of every job (default /input)")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    parser.add_argument("--port", type=int, default=PORT, help=f"port on {HOST} (default {PORT}, the platform's)")
    add_weights_option(parser)
    add_inference_options(parser)
    add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    service = Service(args.input, args.output, args.weights, inference_overrides(args), extras=not args.no_extras)
    threading.Thread(target=service.load_model, name="load-model", daemon=True).start()
    log.info("invoke API on http://%s:%d (GET /health, POST /invoke); loading the model", HOST, args.port)
    build_server(service, args.port).run()
    if service.current is not None:  # an abandoned job still computing: do not wait for it
        log.warning("job %d: still running at exit; not waiting for it", service.current.number)
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
