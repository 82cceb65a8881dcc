"""Output folders that appear whole: written as `<out>.partial` and renamed to `<out>` once complete.

A command that stops part-way (an error, Ctrl-C, SIGTERM) leaves no `<out>` that looks finished, and an
earlier complete `<out>` stays as it was until the new one replaces it. What a stopped command keeps of its
`.partial` folder is its own choice (a training run keeps its finished epochs: training.run.train).

An existing `<out>` is replaced only when it is what the command writes (it holds the command's marker
file, e.g. a run's train_config.json) or is empty: any other folder is refused, never deleted. The
`.partial` sibling is the command's own working folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from algorithm import signals
from training.cli import UsageError

PARTIAL = ".partial"


class StagedFolder:
    """`out`, written under `partial` (its sibling `<name>.partial`) and renamed into place by `commit`."""

    def __init__(self, out: Path, marker: str, option: str = "--out"):
        self.out = Path(out).absolute()
        self.partial = self.out.with_name(self.out.name + PARTIAL)
        self.marker = marker  # a file every complete folder of this kind holds
        self.option = option

    def check(self) -> None:
        """Refuse an `out` that is a file, or a folder this command did not write."""
        out = self.out
        if out.exists() and not (out.is_dir() and ((out / self.marker).is_file() or not any(out.iterdir()))):
            raise UsageError(f"{self.option} {out} exists and is not a folder this command wrote (no "
                             f"{self.marker}); choose another {self.option} or remove it")

    def start(self) -> Path:
        """A fresh, empty `.partial` folder."""
        self.check()
        self.discard()
        self.partial.mkdir(parents=True)
        return self.partial

    def published(self, path: Path) -> Path:
        """Where `path` (inside `.partial`) will be once committed."""
        return self.out / Path(path).relative_to(self.partial)

    def commit(self) -> Path:
        """Replace `out` (an earlier complete folder, if any) with `.partial`; a signal waits until it is done."""
        with signals.deferred():
            if self.out.exists():
                self.check()
                shutil.rmtree(self.out)
            self.partial.rename(self.out)
        return self.out

    def discard(self) -> None:
        if self.partial.exists():
            shutil.rmtree(self.partial)
