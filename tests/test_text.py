"""CLIP text encoder and tokenizer: reference keys, token ids and contexts, bf16."""
import pytest
import torch
from conftest import assert_close_rel, assert_matches_reference_keys, strip_prefix

from featinv.config import TINY_MODEL, TextConfig
from featinv.nets.text import BOS_TOKEN, EOS_TOKEN, CLIPTextEncoder, tokenize

TINY = TINY_MODEL.text
PREFIX = "cond_stage_model.transformer.text_model."
# The fixture prompts: inference-style (ends in ", ") and a plain caption.
PROMPTS = ["a high-quality, detailed, and professional image, ", "a photo of a red fox in the snow"]


@pytest.fixture(scope="module")
def tiny_text(tiny_sd):
    enc = CLIPTextEncoder(TINY).eval()
    enc.load_state_dict(strip_prefix(tiny_sd, PREFIX), strict=True)
    return enc


def test_full_size_keys_match_reference():
    with torch.device("meta"):
        enc = CLIPTextEncoder(TextConfig())
    assert_matches_reference_keys(enc, "text_encoder", PREFIX, 123_060_480)


def test_tokenize_matches_reference(tiny_io):
    assert torch.equal(tokenize(PROMPTS), tiny_io["in_tokens"])
    assert torch.equal(tokenize([""])[0], tiny_io["in_uncond_tokens"][0])
    assert tokenize(PROMPTS).dtype == torch.long


def test_tokenize_truncates_to_eos():
    tokens = tokenize(["word " * 200, "x"], context_length=77)
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == BOS_TOKEN and tokens[0, -1] == EOS_TOKEN
    assert (tokens[0, 1:-1] != EOS_TOKEN).all()
    assert tokens[1, 0] == BOS_TOKEN and (tokens[1, 2:] == EOS_TOKEN).all()


def test_context_matches_reference(tiny_text, tiny_io):
    with torch.no_grad():
        context = tiny_text(tiny_io["in_tokens"])
        uncond = tiny_text(tiny_io["in_uncond_tokens"])
    assert_close_rel(context, tiny_io["text_context"], name="text_context")
    assert_close_rel(uncond, tiny_io["text_uncond_context"], name="text_uncond_context")


def test_causal(tiny_text, tiny_io):
    # Changing a later token must not change earlier positions.
    tokens = tiny_io["in_tokens"].clone()
    with torch.no_grad():
        a = tiny_text(tokens)
        tokens[:, 5] = 1000
        b = tiny_text(tokens)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_bf16_autocast_runs(tiny_text, tiny_io):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_text(tiny_io["in_tokens"])
    assert out.shape == (2, 77, TINY.width) and torch.isfinite(out).all()
    assert_close_rel(out.float(), tiny_io["text_context"], tol=5e-2, name="bf16 text_context")
