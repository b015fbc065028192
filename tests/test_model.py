"""The composed FeatInv model (UNet + ControlNet + adapter) against the reference fixtures."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close_rel

from featinv.checkpoint.load import load_into
from featinv.config import PRESETS
from featinv.nets.controlnet import ControlNet
from featinv.nets.model import FeatInv, guess_mode_scales
from featinv.nets.unet import timestep_embedding

TINY = PRESETS["tiny"].model


@pytest.fixture(scope="module")
def ref_model(tiny_sd):
    model = FeatInv(TINY).eval()
    load_into(model, tiny_sd)
    return model


@torch.no_grad()
def test_control_residuals_match_reference(ref_model, tiny_io):
    io = tiny_io
    assert_close_rel(ref_model.hint(io["in_hint"]), io["hint_block_out"], name="hint_block_out")
    assert_close_rel(ref_model.hint(io["in_hint_tokens"]), io["hint_block_out_tokens"], name="hint tokens")
    ctrl = ref_model.control_residuals(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"])
    assert len(ctrl) == 5 == ref_model.num_control
    for i, c in enumerate(ctrl):
        assert_close_rel(c, io[f"ctrl_{i}"], name=f"ctrl_{i}")


@torch.no_grad()
@pytest.mark.parametrize("name, context, hint, scales", [
    ("eps_ctrl", "in_context", "in_hint", None),
    ("eps_ctrl_uncond", "in_uncond_context", "in_hint", None),
    ("eps_ctrl_tokens", "in_context", "in_hint_tokens", None),
    ("eps_noctrl", "in_context", None, None),
    ("eps_ctrl_guess_scales", "in_context", "in_hint", guess_mode_scales()),
])
def test_eps_matches_reference(ref_model, tiny_io, name, context, hint, scales):
    io = tiny_io
    feats = io[hint] if hint else None
    eps = ref_model(io["in_x_noisy"], io["in_t"], io[context], feats, control_scales=scales)
    assert_close_rel(eps, io[name], name=name)


@torch.no_grad()
def test_nhwc_feature_map_equals_nchw(ref_model, tiny_io):
    hint = tiny_io["in_hint"]
    torch.testing.assert_close(ref_model.hint(hint.permute(0, 2, 3, 1)), ref_model.hint(hint))


@torch.no_grad()
def test_per_sample_scales_and_precomputed_hint(ref_model, tiny_io):
    io = tiny_io
    x, t, ctx, feats = io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"]
    scales = torch.tensor([[1.0] * 5, [0.0] * 5])  # sample 1 without control
    eps = ref_model(x, t, ctx, hint=ref_model.hint(feats), control_scales=scales)
    assert_close_rel(eps[0], io["eps_ctrl"][0], name="controlled sample")
    assert_close_rel(eps[1], io["eps_noctrl"][1], name="uncontrolled sample")


def test_timestep_embedding_matches_reference(tiny_io):
    assert_close_rel(timestep_embedding(tiny_io["in_t"], 32), tiny_io["timestep_embedding"], name="temb")


@torch.no_grad()
def test_fresh_control_branch_leaves_unet_unchanged(ref_model, tiny_io):
    io = tiny_io
    control = ControlNet.from_unet(ref_model.unet, TINY.adapter)
    before = {k: v.clone() for k, v in ref_model.unet.state_dict().items()}
    model = FeatInv(TINY).eval()
    model.unet.load_state_dict(ref_model.unet.state_dict())
    model.control.load_state_dict(control.state_dict())
    eps_ctrl = model(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"])
    eps_plain = model(io["in_x_noisy"], io["in_t"], io["in_context"])
    torch.testing.assert_close(eps_ctrl, eps_plain, rtol=0, atol=0)
    for k, v in ref_model.unet.state_dict().items():  # from_unet copies, it does not move
        assert torch.equal(v, before[k])
    for name in ("time_embed", "input_blocks", "middle_block"):
        for (k, a), b in zip(getattr(control, name).state_dict().items(), getattr(ref_model.unet, name).state_dict().values()):
            assert torch.equal(a, b), k
    assert all(p.abs().sum() == 0 for zc in control.zero_convs for p in zc.parameters())
    assert control.input_hint_block.block[5].weight.abs().sum() == 0


def test_gradients_reach_only_adapter_and_control(ref_model, tiny_io):
    io = tiny_io
    model = FeatInv(TINY)
    model.load_state_dict(ref_model.state_dict())
    model.requires_grad_(False)
    model.control.requires_grad_(True)
    eps = model(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"])
    eps.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("control."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gradient_checkpointing_gives_same_gradients(ref_model, tiny_io):
    io = tiny_io
    grads = []
    for ckpt in (False, True):
        cfg = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, gradient_checkpointing=ckpt))
        model = FeatInv(cfg)
        model.load_state_dict(ref_model.state_dict())
        model.requires_grad_(False)
        model.control.requires_grad_(True)
        model(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"]).square().mean().backward()
        grads.append(model.control.input_hint_block.block[1].weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_end_to_end(ref_model, tiny_io):
    io = tiny_io
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eps = ref_model(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"])
        img = ref_model.decode_latents(io["in_latent"])
    assert eps.dtype == torch.bfloat16 and torch.isfinite(eps).all() and torch.isfinite(img).all()
    assert_close_rel(eps.float(), io["eps_ctrl"], tol=5e-2, name="bf16 eps")


def test_wrong_feature_channels_fail_clearly(ref_model, tiny_io):
    bad = torch.randn(2, 7, 9, 9)
    with pytest.raises(ValueError, match=r"\(2, 7, 9, 9\): expected 16 channels"):
        ref_model(tiny_io["in_x_noisy"], tiny_io["in_t"], tiny_io["in_context"], bad)


def test_wrong_latent_size_fails_clearly(ref_model, tiny_io):
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\).*\(B, 4, 32, 32\)"):
        ref_model(torch.randn(2, 4, 16, 16), tiny_io["in_t"], tiny_io["in_context"], tiny_io["in_hint"])


@torch.no_grad()
def test_other_latent_sizes_work_when_configured():
    cfg = dataclasses.replace(TINY, latent_size=16, adapter=dataclasses.replace(TINY.adapter, grid=16, width=32))
    model = FeatInv(cfg).eval()
    eps = model(torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.randn(2, 77, 32), torch.randn(2, 16, 5, 5))
    assert eps.shape == (2, 4, 16, 16)


@torch.no_grad()
def test_prompt_context_is_cached_and_matches_reference(ref_model, tiny_io):
    prompts = ["a high-quality, detailed, and professional image, ", "a photo of a red fox in the snow"]
    calls = []
    hook = ref_model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        ctx = ref_model.text_context(prompts)
        ctx2 = ref_model.text_context(prompts[::-1] + [""])
    finally:
        hook.remove()
    assert_close_rel(ctx, tiny_io["text_context"], name="text_context from strings")
    assert_close_rel(ctx2[2], tiny_io["text_uncond_context"][0], name="empty prompt")
    assert torch.equal(ctx2[0], ctx[1])
    assert len(calls) == 2  # the second call encoded only the new empty prompt


@torch.no_grad()
def test_vae_through_model_matches_reference(ref_model, tiny_io):
    assert_close_rel(ref_model.decode_latents(tiny_io["in_latent"]), tiny_io["vae_decode_first_stage"], name="decode")
    mean = ref_model.encode_images(tiny_io["in_image"], sample=False)
    assert_close_rel(mean, 0.18215 * tiny_io["vae_post_mean"], name="encode (mean)")
