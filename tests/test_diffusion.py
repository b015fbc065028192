"""Schedule, q_sample and the ε loss against the reference fixtures."""
from __future__ import annotations

import torch
from conftest import assert_close_rel

from featinv.checkpoint.load import load_into
from featinv.config import PRESETS, DiffusionConfig
from featinv.diffusion import schedule as diffusion
from featinv.diffusion.schedule import alphas_cumprod
from featinv.nets.model import FeatInv


def test_schedule_matches_reference(tiny_io, tiny_sd):
    buffers = diffusion.schedule_buffers(DiffusionConfig())
    assert len(buffers) == 13
    for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert_close_rel(buffers[k], tiny_io[f"sched_{k}"], tol=1e-6, name=k)
    for k, v in buffers.items():
        assert torch.allclose(v, tiny_sd[k], rtol=1e-6, atol=1e-12), k
    assert torch.equal(diffusion.alphas_cumprod(DiffusionConfig()), buffers["alphas_cumprod"])


def test_q_sample_matches_reference(tiny_io):
    ac = diffusion.alphas_cumprod(DiffusionConfig())
    out = diffusion.q_sample(tiny_io["in_x_start"], tiny_io["in_t_train"], tiny_io["in_noise"], ac)
    assert_close_rel(out, tiny_io["q_sample"], name="q_sample")


def test_pred_x0_inverts_q_sample():
    ac = diffusion.alphas_cumprod(DiffusionConfig())
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    xt = diffusion.q_sample(x0, t, noise, ac)
    rec = diffusion.pred_x0(xt, noise, ac[t].view(-1, 1, 1, 1))
    torch.testing.assert_close(rec, x0, rtol=1e-3, atol=2e-3)


def test_loss_and_gradients_match_reference(tiny_sd, tiny_io):
    io = tiny_io
    model = FeatInv(PRESETS["tiny"].model)
    load_into(model, tiny_sd)
    model.requires_grad_(False)
    model.control.requires_grad_(True)
    loss = diffusion.eps_loss(lambda x, t: model(x, t, io["in_context"], io["in_hint"]),
                              io["in_x_start"], io["in_t_train"], io["in_noise"], alphas_cumprod(model.cfg.diffusion))
    assert_close_rel(loss, io["loss_simple"], name="loss")
    loss.backward()
    params = dict(model.named_parameters())
    for key, ref in [("input_hint_block.block.5.weight", "grad_hint_block_out_w"),
                     ("input_hint_block.block.1.weight", "grad_hint_block_in_w"),
                     ("zero_convs.0.0.weight", "grad_zero_conv0_w"),
                     ("middle_block_out.0.weight", "grad_middle_block_out_w"),
                     ("input_blocks.1.0.in_layers.2.weight", "grad_ctrl_in1_conv_w")]:
        assert_close_rel(params["control." + key].grad, io[ref], name=ref)
