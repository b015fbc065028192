"""AutoencoderKL: reference key layout, numeric parity on the tiny fixtures, shapes, bf16."""
import pytest
import torch
from conftest import assert_close_rel, assert_matches_reference_keys, strip_prefix

from featinv.config import VAEConfig
from featinv.nets.autoencoder import AutoencoderKL

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd):
    vae = AutoencoderKL(TINY).eval()
    vae.load_state_dict(strip_prefix(tiny_sd, PREFIX), strict=True)
    return vae


def test_full_size_keys_match_reference():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    assert_matches_reference_keys(vae, "vae", PREFIX, 83_653_863)


def test_encode_matches_reference(tiny_vae, tiny_io):
    with torch.no_grad():
        mean, logvar = tiny_vae.encode(tiny_io["in_image"])
    assert_close_rel(mean, tiny_io["vae_post_mean"], name="vae_post_mean")
    assert_close_rel(logvar, tiny_io["vae_post_logvar"], name="vae_post_logvar")


def test_decode_matches_reference(tiny_vae, tiny_io):
    with torch.no_grad():
        image = tiny_vae.decode(tiny_io["in_latent"] / TINY.scale_factor)
    assert_close_rel(image, tiny_io["vae_decode_first_stage"], name="vae_decode_first_stage")


def test_logvar_is_clamped(tiny_vae):
    # A huge quant_conv bias pushes the raw log-variance far outside [-30, 20].
    vae = AutoencoderKL(TINY)
    vae.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        vae.quant_conv.bias[TINY.embed_dim:] = 1e3
        _, high = vae.encode(torch.zeros(1, 3, 16, 16))
        vae.quant_conv.bias[TINY.embed_dim:] = -1e3
        _, low = vae.encode(torch.zeros(1, 3, 16, 16))
    assert torch.all(high == 20.0) and torch.all(low == -30.0)


@pytest.mark.parametrize("cfg, size", [(TINY, (48, 40)), (VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2), (32, 24))])
def test_encode_decode_shapes(cfg, size):
    vae = AutoencoderKL(cfg)
    f = 2 ** (len(cfg.ch_mult) - 1)
    x = torch.rand(2, 3, *size) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, cfg.embed_dim, size[0] // f, size[1] // f)
    assert vae.decode(mean).shape == x.shape


def test_bf16_autocast_runs(tiny_vae, tiny_io):
    x = tiny_io["in_image"][:1, :, :32, :32]
    with torch.no_grad():
        ref = tiny_vae.decode(tiny_vae.encode(x)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, _ = tiny_vae.encode(x)
            out = tiny_vae.decode(mean)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert_close_rel(out.float(), ref, tol=5e-2, name="bf16 reconstruction")
