"""What the frame search reports while the network runs (a CPU case takes minutes), and log lines from it.

The search calls `start` once, `stage` at the beginning of every pass over the stack (the dense scan, the
coarse pass, each refinement round, the late masks), `advance` after every batch and `finish` at the end.
`SearchProgress` ignores all of it; `LoggedProgress` writes a line for each call but `advance` (the CLI
without a terminal, the invoke server); the CLI's progress bar on a terminal is another subclass.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("algorithm")


class SearchProgress:
    """Receives the search's progress and reports nothing; subclasses show it."""

    def start(self, frames: int, candidates: int) -> None:
        """The search begins on a stack of `frames` frames, `candidates` of which are not lift-off."""

    def stage(self, name: str, frames: int) -> None:
        """A pass begins that runs `frames` frames through the encoder."""

    def advance(self, frames: int) -> None:
        """`frames` more frames of the current pass are encoded."""

    def finish(self, encoded: int, decoded: int) -> None:
        """The search is over: frames encoded (a frame encoded twice counts twice) and decoded."""


class LoggedProgress(SearchProgress):
    """An INFO line when the network starts, one per pass, and one when it is done: never one per batch."""

    network_started: float = 0.0

    def start(self, frames: int, candidates: int) -> None:
        self.network_started = time.perf_counter()
        log.info("network: started on %d frames, %d of them not lift-off", frames, candidates)

    def stage(self, name: str, frames: int) -> None:
        log.info("network: %s, %d frames", name, frames)

    def finish(self, encoded: int, decoded: int) -> None:
        log.info("network: done in %.1f s, %d frames encoded, %d decoded", time.perf_counter() - self.network_started,
                 encoded, decoded)
