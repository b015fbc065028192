"""Run-time policy shared by training and reconstruction: the Lightning precision, the seeding rule.

Seeding: every random draw that must be reproducible comes from its own ``torch.Generator``
seeded by a function of stable names, never from the global RNG:
- reconstruction: :func:`featinv.reconstruct.sample_seed` (blake2b of ``seed, key, k``; keys are
  strings, whose ``hash`` is salted per process, so a real hash function is needed);
- training: ``hash((seed, step, rank)) % 2**63`` in ``FeatInvModule.step_generator``. The hash of a
  tuple of ints is NOT salted (PYTHONHASHSEED only salts str, bytes and datetime): an int hashes to
  itself modulo 2**61 - 1 and the tuple hash is a fixed xxHash-style combination (CPython >= 3.8),
  so the value is the same in every process, run and 64-bit machine. It is kept as is because
  changing it would change every trained weight (and the demo's numbers) for the same seed.
"""
from __future__ import annotations

import torch


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for training and reconstruction; ``auto``: bf16 mixed precision on GPUs
    that support bf16, fp32 otherwise (and on the CPU)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
