"""The networks are ``torch.compile``-friendly: each captures as one graph (``fullgraph=True``).

``aot_eager`` traces forward and backward like inductor does but runs the captured graph eagerly,
so the test needs no C++ toolchain and checks the numbers too."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from featinv.config import PRESETS
from featinv.nets.model import FeatInv
from featinv.nets.text import tokenize


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_featinv_training_forward_and_backward_capture_as_one_graph(checkpointing):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].model
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, gradient_checkpointing=checkpointing))
    model = FeatInv(cfg).train()
    model.requires_grad_(False)
    model.control.requires_grad_(True)
    x = torch.randn(2, 4, cfg.latent_size, cfg.latent_size)
    t = torch.tensor([10, 700])
    ctx = model.text_context(["a photo", ""])
    feats = torch.randn(2, cfg.adapter.in_channels, 2, 2)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        eps = fn(x, t, ctx, feats)
        eps.square().mean().backward()
        return eps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eps_ref, g_ref = grads(model)
    eps_c, g_c = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))  # a graph break raises
    torch.testing.assert_close(eps_c, eps_ref, rtol=1e-4, atol=1e-5)
    assert g_c.keys() == g_ref.keys() and all(n.startswith("control.") for n in g_c)
    for n in g_ref:
        torch.testing.assert_close(g_c[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)


def test_text_encoder_and_autoencoder_capture_as_one_graph():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].model
    model = FeatInv(cfg).eval()
    tokens = tokenize(["a photo of a fox", ""], cfg.text.context_length)
    z = torch.randn(1, 4, cfg.latent_size, cfg.latent_size)
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        for fn, arg in ((model.text_encoder, tokens), (model.vae.decode, z), (model.vae.encode, image)):
            ref = fn(arg)
            out = torch.compile(fn, fullgraph=True, backend="aot_eager")(arg)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
