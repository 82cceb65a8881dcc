"""Local runner: the algorithm in this process, the model loaded once for all cases.

Per case it calls what `python -m algorithm` calls after loading the model
(`algorithm.run.process_case`), so its outputs are those of the CLI run on the same case with the same weights and settings
(test/test_benchmark.py checks frame numbers and mask file bytes). The next case's stack is read in a
background thread while the current one runs through the network.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from algorithm.contract import read_stack
from algorithm.run import load, process_case
from algorithm.weights_location import resolve_weights

from .cases import Case

log = logging.getLogger("training.benchmark")


class LocalRunner:
    name = "local"
    parallel = 1  # one model, one case at a time; reading overlaps with inference

    def __init__(self, weights: Path | None = None, device: str = "auto", batch_size: int | None = None,
                 coarse_stride: int | None = None, extras: bool = True, precision: str | None = None):
        self.weights = weights
        self.overrides = {k: v for k, v in {"device": device, "precision": precision, "batch_size": batch_size,
                                            "coarse_stride": coarse_stride}.items() if v is not None}
        self.extras = extras
        self.network = None
        self.checkpoint: dict = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._ahead: dict[Path, Future] = {}
        self.cases_run = 0  # tests check what a resumed run redoes

    def start(self) -> dict:
        weights = resolve_weights(self.weights)
        started = time.perf_counter()
        self.network, self.checkpoint = load(weights, self.overrides)
        seconds = time.perf_counter() - started
        log.info("weights %s on %s (%.1f s): %s", weights, self.network.device, seconds,
                 self.checkpoint["provenance"])
        return {"weights": str(weights), "device": str(self.network.device), "overrides": self.overrides,
                "checkpoint": self.checkpoint, "model_load_s": round(seconds, 3)}

    def upcoming(self, case: Case) -> None:
        """Start reading the next case while the current one is predicted."""
        if case.image not in self._ahead:
            self._ahead[case.image] = self._reader.submit(read_stack, case.image)

    def _stack(self, case: Case):
        future = self._ahead.pop(case.image, None)
        return future.result() if future is not None else read_stack(case.image)

    def run_case(self, case: Case, staging: Path) -> dict:
        """Predict one case into `staging` (laid out like /output); returns its timings."""
        assert self.network is not None, "start() first"
        self.cases_run += 1
        started = time.perf_counter()
        stack = self._stack(case)
        read_seconds = time.perf_counter() - started
        result, summary = process_case(self.network, self.checkpoint, stack, staging, extras=self.extras)
        summary["timings_s"]["read"] = round(read_seconds, 3)
        summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        return {"frame": result.frame, "ac_mm": summary["ac_mm"], "plane": summary["plane"],
                "timings_s": summary["timings_s"]}

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._reader.shutdown(wait=True)
