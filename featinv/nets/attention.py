"""Cross-attention and the SD-1.x spatial transformer, on ``F.scaled_dot_product_attention``.

Attribute names (``attn1.to_q``, ``ff.net.0.proj``, ``proj_in`` ...) mirror the LDM checkpoint
keys so that weights load by prefix alone (see ``checkpoint.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head (cross-)attention; q/k/v without bias, scale dim_head**-0.5."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # key `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); context: (B, S, context_dim) or None for self-attention."""
        context = x if context is None else context
        # (B, heads, L, d) layout for SDPA
        q, k, v = (rearrange(p(s), "b l (h d) -> b h l d", h=self.heads)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (exact erf GELU), dim -> inner."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width 4*dim; keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention on the text context, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 conv -> transformer over the H*W tokens -> 1x1 conv, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, 77, context_dim)."""
        h = self.proj_in(self.norm(x))
        height = h.shape[2]
        h = rearrange(h, "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "b (h w) c -> b c h w", h=height)
        return x + self.proj_out(h)
