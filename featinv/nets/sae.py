"""Sparse autoencoders over channel vectors: TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024) and, for
imported ones, JumpReLU (Rajamanoharan et al. 2024).

x (n, d) -> codes (n, latents) >= 0 -> x_hat = codes @ W_dec + b_pre, with unit-norm decoder rows (atoms).
Only a few latents are active per vector (k of thousands), so every step past the dense encoder matmul works on
the active (row, latent) pairs alone: the encoder's backward pass (:class:`_GatherLinear`) and the decoder
(``embedding_bag`` over the active atoms) cost n·k·d instead of n·latents·d. Training (the unit-norm constraint,
AuxK, the BatchTopK threshold estimate) is :mod:`featinv.analysis.sae`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("topk", "batchtopk", "jumprelu")
TRAINED_KINDS = ("topk", "batchtopk")   # what featinv.analysis.sae.train_sae trains; jumprelu SAEs are imported


class Active(NamedTuple):
    """The active (row, latent) pairs of a batch of n vectors, in row-major order.

    values: (nnz,) >= 0, differentiable (sparse backward); rows: (nnz,) int64, non-decreasing; cols: (nnz,) int64
    latent indices; pre: (n, latents) the pre-activations W_enc (x - b_pre) + b_enc, detached (no graph)."""

    values: Tensor
    rows: Tensor
    cols: Tensor
    pre: Tensor


class _GatherLinear(torch.autograd.Function):
    """pre[rows, cols] where pre = x_c @ W_enc.T + b_enc is already computed; the backward pass reads only the
    selected pairs (n·k·d work instead of the dense matmul's 2·n·latents·d). Gradients are computed in fp32."""

    @staticmethod
    def forward(pre: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        return pre[rows, cols]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, x_c, W_enc, _, rows, cols = inputs
        ctx.save_for_backward(x_c, W_enc, rows, cols)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_c, W_enc, rows, cols = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)
        n, latents = x_c.shape[0], W_enc.shape[0]
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[1]:  # d/dx_c = Σ_latents g · W_enc row, one bag of active latents per row
            g_x = F.embedding_bag(cols, W_enc, _offsets(rows, n), mode="sum", per_sample_weights=grad).to(x_c.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            by_latent, order = torch.sort(cols, stable=True)  # stable: the same summation order on every run
            g_w = F.embedding_bag(rows[order], x_c.to(W_enc.dtype), _offsets(by_latent, latents), mode="sum",
                                  per_sample_weights=grad[order])
            g_b = torch.bincount(cols, weights=grad, minlength=latents).to(W_enc.dtype)
        return None, g_x, g_w, g_b, None, None


def _offsets(sorted_ids: Tensor, bags: int) -> Tensor:
    """(bags,) start of each bag in a non-decreasing id list (an absent id gives an empty bag)."""
    return torch.searchsorted(sorted_ids, torch.arange(bags, device=sorted_ids.device))


class SparseAutoencoder(nn.Module):
    """x (n, d) -> codes (n, latents) -> x_hat = codes @ W_dec + b_pre. kind 'topk' (Gao et al. 2024),
    'batchtopk' (Bussmann et al. 2024) or 'jumprelu' (Rajamanoharan et al. 2024).

    topk keeps each row's top_k pre-activations; batchtopk keeps the batch's top n·top_k in training (rows share a
    budget of k on average) and, in eval mode, every pre-activation above ``threshold`` (so one vector's codes do
    not depend on its batch); jumprelu keeps every positive pre-activation at or above its latent's threshold (no
    top_k: give None). Parameters: b_pre (d,) subtracted before encoding and added after decoding; W_enc
    (latents, d); b_enc (latents,); W_dec (latents, d), the atoms (unit-norm rows when featinv trains them).
    Buffer: threshold float32, () the batchtopk inference threshold (0 until training sets it), (latents,) the
    jumprelu thresholds."""

    def __init__(self, d: int, latents: int, top_k: int | None, kind: str = "topk",
                 generator: torch.Generator | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown sparse autoencoder kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "jumprelu" and top_k is not None:
            raise ValueError(f"a jumprelu SAE has a threshold per latent, not top_k (got top_k={top_k})")
        if kind != "jumprelu" and not (isinstance(top_k, int) and 1 <= top_k <= latents):
            raise ValueError(f"top_k must be in [1, latents={latents}], got {top_k}")
        self.d, self.latents, self.top_k, self.kind = d, latents, top_k, kind
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.W_enc = nn.Parameter(torch.empty(latents, d))
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.W_dec = nn.Parameter(torch.empty(latents, d))
        self.register_buffer("threshold", torch.zeros(latents if kind == "jumprelu" else ()))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm atoms (normal draws on the CPU from ``generator``), the encoder tied to them
        (W_enc = W_dec here; Gao et al. 2024's W_enc = W_decᵀ in their column layout), zero biases and threshold."""
        atoms = F.normalize(torch.randn(self.latents, self.d, generator=generator), dim=1)
        self.W_dec.copy_(atoms)
        self.W_enc.copy_(atoms)
        self.b_pre.zero_()
        self.b_enc.zero_()
        self.threshold.zero_()

    def extra_repr(self) -> str:
        return f"d={self.d}, latents={self.latents}, top_k={self.top_k}, kind={self.kind!r}"

    def pre_codes(self, x: Tensor) -> Tensor:
        """x (n, d) -> relu(W_enc (x - b_pre) + b_enc) (n, latents), dense, before the top-k selection."""
        return F.relu(F.linear(x - self.b_pre, self.W_enc, self.b_enc))

    def select(self, x: Tensor) -> Active:
        """x (n, d) -> the active pairs (see :class:`Active`). topk: each row's top_k; batchtopk: the batch's top
        n·top_k in training mode, the pre-activations above ``threshold`` in eval mode (a data-dependent count);
        jumprelu: the positive pre-activations at or above their latent's threshold."""
        x_c = x - self.b_pre
        # The dense pre-activations carry no graph: gradients reach the encoder through the selected pairs only.
        pre = F.linear(x_c.detach(), self.W_enc.detach(), self.b_enc.detach())
        n = pre.shape[0]
        if self.kind == "topk":
            cols = pre.topk(self.top_k, dim=1, sorted=False).indices.flatten()
            rows = torch.arange(n, device=pre.device).repeat_interleave(self.top_k)
        elif self.kind == "jumprelu":
            rows, cols = ((pre > 0) & (pre >= self.threshold)).nonzero(as_tuple=True)
        elif self.training:
            flat = pre.flatten().topk(n * self.top_k, sorted=False).indices.sort().values
            rows, cols = flat // self.latents, flat % self.latents
        else:
            rows, cols = (pre > self.threshold).nonzero(as_tuple=True)
        return Active(F.relu(self.gather(x_c, pre, rows, cols)), rows, cols, pre)

    def gather(self, x_c: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """pre[rows, cols] (nnz,), differentiable with respect to x_c (n, d) = x - b_pre, W_enc and b_enc
        (the backward pass touches only the selected pairs). pre: (n, latents) from :meth:`select`."""
        return _GatherLinear.apply(pre, x_c, self.W_enc, self.b_enc, rows, cols)

    def atoms_sum(self, values: Tensor, rows: Tensor, cols: Tensor, n: int) -> Tensor:
        """Σ values · W_dec[cols] per row -> (n, d), reading only the active atoms. rows: (nnz,) non-decreasing."""
        return F.embedding_bag(cols, self.W_dec, _offsets(rows, n), mode="sum",
                               per_sample_weights=values.to(self.W_dec.dtype))

    def dense_codes(self, active: Active) -> Tensor:
        """The active pairs scattered into (n, latents) codes (differentiable in the values)."""
        n, latents = active.pre.shape
        flat = active.values.new_zeros(n * latents).index_put((active.rows * latents + active.cols,), active.values)
        return flat.view(n, latents)

    def encode(self, x: Tensor) -> Tensor:
        """x (n, d) -> codes (n, latents) >= 0: topk: at most top_k non-zeros per row; batchtopk: at most n·top_k
        in the batch while training, those above ``threshold`` in eval mode."""
        return self.dense_codes(self.select(x))

    def decode(self, codes: Tensor) -> Tensor:
        """codes (n, latents) -> codes @ W_dec + b_pre (n, d), reading only the atoms of the non-zero codes (any
        codes: edited ones may hold more than top_k non-zeros per row). The non-zeros are a data-dependent count."""
        rows, cols = codes.nonzero(as_tuple=True)
        return self.atoms_sum(codes[rows, cols], rows, cols, codes.shape[0]) + self.b_pre

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (n, d) -> (codes (n, latents), x_hat (n, d))."""
        active = self.select(x)
        x_hat = self.atoms_sum(active.values, active.rows, active.cols, x.shape[0]) + self.b_pre
        return self.dense_codes(active), x_hat

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], top_k: int | None, kind: str) -> SparseAutoencoder:
        """An SAE from state_dict-like tensors (b_pre, W_enc, b_enc, W_dec, threshold); d and latents come from
        W_dec. A missing, unexpected or mis-shaped key is a ValueError naming every one."""
        if "W_dec" not in tensors or tensors["W_dec"].ndim != 2:
            raise ValueError("sparse autoencoder tensors need a 2-D 'W_dec' (latents, d)")
        latents, d = tensors["W_dec"].shape
        sae = cls(d, latents, top_k, kind)
        expected = sae.state_dict()
        problems = [f"missing {k!r}" for k in expected if k not in tensors]
        problems += [f"unexpected {k!r}" for k in tensors if k not in expected]
        problems += [f"{k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
                     for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
        if problems:
            raise ValueError("sparse autoencoder tensors: " + "; ".join(problems))
        sae.load_state_dict(tensors)
        return sae
