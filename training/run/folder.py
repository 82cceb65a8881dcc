"""A training run's output folder: staged, kept when a stopped run has finished epochs, resumed from there.

The run writes into `<out>.partial` and renames it to `<out>` when every trial is exported
(training.staging), so `<out>` only ever holds a complete run. When a run stops part-way (Ctrl-C, SIGTERM,
an error), `<out>.partial` is kept if an epoch finished (each trial's last.pt can be resumed, best.pt holds
its best epoch so far) and removed otherwise. `--resume` continues `<out>.partial`, or a complete `<out>`
(moved back to `<out>.partial` while it runs); a new run without `--resume` refuses to overwrite finished
epochs in `<out>.partial`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from algorithm import signals
from training.cli import UsageError
from training.staging import StagedFolder

CONFIG_FILE = "train_config.json"  # what makes a folder a run folder
LAST = "last.pt"


class RunFolder(StagedFolder):
    def __init__(self, out: Path):
        super().__init__(out, marker=CONFIG_FILE)

    def finished_epochs(self) -> list[Path]:
        """The last.pt of every trial in `.partial` (at least one epoch done)."""
        return sorted(self.partial.glob(f"trial_*/{LAST}")) if self.partial.is_dir() else []

    def check_start(self, resume: bool) -> None:
        """Refuse what `open` would refuse; reads only, so every process of a torchrun job can call it."""
        self.check()
        if not resume and self.finished_epochs():
            raise UsageError(f"{self.partial} holds finished epochs of a stopped run: --resume continues it; "
                             "remove the folder to start again")

    def open(self, resume: bool, config: dict[str, Any]) -> Path:
        """The folder the run writes into, with the run's train_config.json (rank 0 only)."""
        self.check_start(resume)
        if resume and not self.partial.exists() and (self.out / CONFIG_FILE).is_file():
            with signals.deferred():
                self.out.rename(self.partial)
        elif not (resume and self.partial.exists()):
            self.start()
        (self.partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return self.partial

    def stop(self) -> str | None:
        """After a run stopped part-way: keep `.partial` if an epoch finished (returns a sentence saying where),
        else remove it."""
        if self.finished_epochs():
            return f"the finished epochs are in {self.partial} (--resume continues the run)"
        self.discard()
        return None
