"""Training progress on stderr (stdout keeps a command's messages and results): Rich's live bar on a
terminal, whole lines in a log."""
from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch

from featinv.runtime import PROGRESS_EVERY_S, LineClock


class LineProgress(pl.callbacks.ProgressBar):
    """Training progress as whole lines on stderr (for logs, where a live bar's redraws are noise): the first
    and last step, and at most one line every ``seconds`` in between (:class:`~featinv.runtime.LineClock`, the
    policy of every progress line in a log); rank 0 only."""

    def __init__(self, seconds: float = PROGRESS_EVERY_S):
        super().__init__()
        self.seconds, self._enabled = seconds, True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock, self._first = LineClock(self.seconds), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        step = trainer.global_step
        if self._clock.due(step == self._first + 1, step >= trainer.max_steps):
            metrics = "".join(f"  {k} {float(v):.4f}" for k, v in self.get_metrics(trainer, pl_module).items()
                              if k.startswith("train/") and isinstance(v, (int, float, torch.Tensor)))
            rate = (step - self._first) / self._clock.elapsed()
            print(f"step {step}/{trainer.max_steps}{metrics}  ({rate:.2f} steps/s)", file=sys.stderr, flush=True)


def progress_to_stderr(trainer: pl.Trainer) -> None:
    """Replace Lightning's progress bar (it draws on stdout) by one on stderr: Rich's live bar on a
    terminal, :class:`LineProgress` otherwise (or without rich). stdout keeps the run's messages."""
    bars = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.ProgressBar)]
    if not bars:
        return
    new = LineProgress()
    if sys.stderr.isatty() and isinstance(bars[0], pl.callbacks.RichProgressBar):
        new = pl.callbacks.RichProgressBar(console_kwargs={"stderr": True})
    trainer.callbacks = [c for c in trainer.callbacks if c not in bars] + [new]
