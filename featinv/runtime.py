"""Run-time policy shared by the commands: the Lightning precision, the seeding rule, the CPU threads.

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
import warnings

import torch


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for training and reconstruction; ``auto``: bf16 mixed precision on GPUs
    that support bf16, fp32 otherwise (and on the CPU)."""
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
    n = threads if threads > 0 else default_threads()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


class _DropTips(logging.Filter):
    """Lightning's advertising ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence what a featinv user cannot act on in train/reconstruct output: Lightning's tips, and a
    deprecation inside Lightning's own code (its use of torch's ``LeafSpec``). Idempotent."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
