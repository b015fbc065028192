"""Overcomplete's sparse autoencoders (``overcomplete.sae.TopKSAE``, ``BatchTopKSAE``, ``JumpSAE``), saved as a
state dict, as the tensors of featinv's :class:`featinv.nets.sae.SparseAutoencoder` (the one place that knows
their keys).

Overcomplete's default SAE: codes = TopK(ReLU(x @ W.T + b)) (``encoder.final_block.0``), x_hat = codes @ D with
D = rows of ``dictionary._weights`` scaled to unit l2 norm (its default ``normalization='l2'``: w / (|w| + 1e-8))
times exp(``dictionary.multiplier``); no pre-bias. BatchTopK keeps its inference threshold (``running_threshold``)
outside the state dict: it must be given. JumpSAE keeps its per-latent thresholds as logarithms
(``thresholds``): codes = ReLU(pre), zeroed below exp(``thresholds``).
"""
from __future__ import annotations

import os

import torch

from featinv.checkpoint.load import read_state_dict
from featinv.checkpoint.tensor_files import check_finite

KEYS = {"encoder.final_block.0.weight": "W_enc", "encoder.final_block.0.bias": "b_enc"}
DICTIONARY, MULTIPLIER, LOG_THRESHOLDS = "dictionary._weights", "dictionary.multiplier", "thresholds"
IGNORED = ("dictionary._fused_dictionary",)  # eval-mode cache of D, when a version saves it


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict file as every checkpoint is read (:func:`featinv.checkpoint.load.read_state_dict`: .safetensors,
    or a torch pickle with ``weights_only=True``, no code runs), checked for NaN/inf. ValueError naming the file."""
    state, _ = read_state_dict(path)
    check_finite(state, str(path))
    return state


def overcomplete_to_sae(state: dict[str, torch.Tensor], kind: str, threshold: float | None = None,
                        source: str = "the state dict") -> dict[str, torch.Tensor]:
    """Overcomplete's state dict -> {b_pre, W_enc, b_enc, W_dec, threshold} for SparseAutoencoder.from_tensors.
    kind: 'topk', 'batchtopk' or 'jumprelu'. ValueError naming the keys when it is not a plain (one linear layer)
    SAE of that kind."""
    jump = kind == "jumprelu"
    own = (*KEYS, DICTIONARY) + ((LOG_THRESHOLDS,) if jump else ())
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in (*own, MULTIPLIER, *IGNORED)]
    if missing or extra:
        name = "JumpSAE" if jump else "TopK/BatchTopK SAE"
        raise ValueError(f"{source}: not an Overcomplete {name} with its default one-layer encoder ("
                         + "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                                   f"unexpected {', '.join(extra[:4])}" if extra else ""])) + ")")
    weights = state[DICTIONARY].float()
    scale = torch.exp(state[MULTIPLIER].float()) if MULTIPLIER in state else torch.tensor(1.0)
    W_dec = weights / (weights.norm(dim=1, keepdim=True) + 1e-8) * scale
    if kind == "batchtopk" and threshold is None:
        raise ValueError(f"{source}: a BatchTopK SAE's inference threshold (Overcomplete's running_threshold) is not "
                         "in its state dict: give it (--sae-threshold)")
    tensors = {"b_pre": torch.zeros(W_dec.shape[1]), "W_dec": W_dec.contiguous(),
               **{new: state[old].float().contiguous() for old, new in KEYS.items()},
               "threshold": state[LOG_THRESHOLDS].float().exp() if jump else torch.tensor(float(threshold or 0.0))}
    return tensors
