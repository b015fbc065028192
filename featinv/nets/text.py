"""CLIP ViT-L/14 text encoder (SD-1.x conditioning) and its tokenizer.

The module tree mirrors Hugging Face ``CLIPTextModel.text_model``, so the reference's
``cond_stage_model.transformer.text_model.*`` keys load after stripping that prefix. Position
ids are computed on the fly (no ``position_ids`` buffer, hence no such key).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from featinv.config import TextConfig

BOS_TOKEN = 49406  # <|startoftext|>
EOS_TOKEN = 49407  # <|endoftext|>; SD-1.x also pads with it (open_clip's own tokenize pads with 0)


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer():
    """open_clip's byte-level BPE with its bundled CLIP vocabulary (built once, on first use)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(prompts: list[str], context_length: int = 77) -> torch.LongTensor:
    """Prompts -> (B, context_length) int64: BOS, BPE tokens, EOS, then EOS padding.

    Matches the HF ``CLIPTokenizer(padding="max_length", truncation=True)`` output that the
    reference feeds its encoder: too-long prompts are cut so that EOS is still the last token.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a list of prompts, not a single string")
    bpe = _bpe_tokenizer()
    tokens = torch.full((len(prompts), context_length), EOS_TOKEN, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = [BOS_TOKEN] + bpe.encode(prompt)[: context_length - 2] + [EOS_TOKEN]
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings: (B, L) int64 -> (B, L, width)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int64 with L <= context_length -> (B, L, width)."""
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased projections: (B, L, width) -> same."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        # Declared k, v, q so state_dict order equals the reference's.
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, width) -> (B, L, width)."""
        b, length, width = x.shape
        # (B, L, width) -> (B, heads, L, d); SDPA's default scale d^-0.5 is CLIP's.
        q, k, v = (p(x).view(b, length, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal mask only: SD-1.x passes no padding mask, so padding positions attend too.
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(h.transpose(1, 2).reshape(b, length, width))


class CLIPMLP(nn.Module):
    """fc1 -> quick_gelu -> fc2: (B, L, width) -> same."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, width) -> (B, L, width)."""
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); (B, L, width) -> same."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, width) -> (B, L, width)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of ``layers`` encoder layers (HF name ``encoder.layers.{n}``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, width) -> (B, L, width)."""
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEncoder(nn.Module):
    """Tokens -> context for cross-attention: (B, 77) int64 -> (B, 77, width) last hidden state.

    The output is taken after ``final_layer_norm`` at every position (not pooled), as SD-1.x does.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int64, L <= context_length -> context (B, L, width)."""
        return self.final_layer_norm(self.encoder(self.embeddings(tokens)))
