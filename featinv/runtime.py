"""Run-time policy shared by the commands: the Lightning precision, the seeding rule, the CPU threads, progress
and Lightning's messages. Importing it does not import torch (the command line reads it before loading torch).

Seeding: every random draw that must be reproducible comes from its own ``torch.Generator``
seeded by a function of stable names, never from the global RNG:
- reconstruction: :func:`featinv.diffusion.reconstruct.sample_seed` (blake2b of ``seed, key, k``; keys are
  strings, whose ``hash`` is salted per process, so a real hash function is needed);
- training: ``hash((seed, step, rank)) % 2**63`` in ``FeatInvModule.step_generator``. The hash of a
  tuple of ints is NOT salted (PYTHONHASHSEED only salts str, bytes and datetime): an int hashes to
  itself modulo 2**61 - 1 and the tuple hash is a fixed xxHash-style combination (CPython >= 3.8),
  so the value is the same in every process, run and 64-bit machine. It is kept as is because
  changing it would change every trained weight (and the demo's numbers) for the same seed.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from time import monotonic

PROGRESS_EVERY_S = 30.0  # in a log, at most one progress line this often between the first and the last


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for training and reconstruction; ``auto``: bf16 mixed precision on GPUs
    that support bf16, fp32 otherwise (and on the CPU)."""
    import torch

    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """torch's CPU threads, one rule for every command: ``OMP_NUM_THREADS`` when set, else one less than
    the usable cores (at least 1). The core left free serves data loading and the rest of the machine:
    with every core busy, OpenMP's barriers make each op wait for the slowest thread (README: Threads)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, usable_cores() - 1)


def configure_threads(threads: int = 0) -> int:
    """Set torch's CPU threads (``threads``, else :func:`default_threads`) and flush denormals (tiny
    activations otherwise slow CPU convolutions down many times); returns the thread count."""
    import torch

    n = threads if threads > 0 else default_threads()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


class LineClock:
    """When a log gets a progress line: at the first update, at the last, and at most once every ``seconds``
    in between (a live bar's redraws would be noise there). Also the seconds since it was made, for rates."""

    def __init__(self, seconds: float = PROGRESS_EVERY_S):
        self.seconds = seconds
        self.start = self._last = monotonic()

    def due(self, first: bool, last: bool) -> bool:
        now = monotonic()
        if first or last or now - self._last >= self.seconds:
            self._last = now
            return True
        return False

    def elapsed(self) -> float:
        return max(monotonic() - self.start, 1e-9)


class LineBar:
    """The part of tqdm's face featinv uses (iteration, ``update``, ``set_postfix``, ``close``, ``with``), drawn
    as whole lines on stderr: ``desc: done/total unit (rate unit/s)`` and the postfix, when :class:`LineClock`
    says. It never writes a carriage return, and nothing after :meth:`close` (nor on closing: an interrupted
    loop leaves its last line as it was)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = len(iterable) if total is None else total
        self.n, self.postfix, self.closed = 0, "", False
        self._clock = LineClock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        first, self.n = self.n == 0, self.n + n
        if not self.closed and self._clock.due(first, self.n >= self.total):
            print(self.line(), file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> str:
        rate = self.n / self._clock.elapsed()
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s)"
        return f"{text}  {self.postfix}" if self.postfix else text

    def close(self) -> None:
        self.closed = True


def progress_bar(iterable=None, *, total: int | None = None, desc: str, unit: str):
    """Progress on stderr (stdout keeps a command's results): tqdm's live bar on a terminal, else a
    :class:`LineBar` (whole lines for a log). ``total`` defaults to ``len(iterable)``."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)
    return LineBar(iterable, total, desc, unit)


def stderr_line(text: str) -> None:
    """Print ``text`` as one line on stderr: progress and notes, never results (those go to stdout)."""
    print(text, file=sys.stderr, flush=True)


# What Lightning logs through rank_zero_info that a featinv user cannot act on: its advertising ("💡 Tip: ... try
# installing litlogger"), the device banner (HPU: Lightning 2.2), the normal end of a fit, and its own line on Ctrl-C (featinv's
# command faces print one line for that).
LIGHTNING_NOISE = re.compile(r"💡 Tip:|^(GPU|TPU|HPU) available: |^`Trainer\.fit` stopped: `max_(steps|epochs)=|"
                             r"^\s*Detected KeyboardInterrupt, attempting graceful shutdown")


class _DropLightningNoise(logging.Filter):
    """Drops the records :data:`LIGHTNING_NOISE` matches; every other one (warnings included) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOISE.search(record.getMessage())


def quiet_lightning() -> None:
    """Silence what a featinv user cannot act on in train/reconstruct output: :data:`LIGHTNING_NOISE` (a filter
    on the logger of Lightning's ``rank_zero_info``, no level change) and a deprecation inside Lightning's own
    code (its use of torch's ``LeafSpec``). Idempotent."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningNoise) for f in logger.filters):
        logger.addFilter(_DropLightningNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
