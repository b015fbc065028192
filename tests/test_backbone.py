"""Frozen feature extractor: shapes per backbone, normalisation, freezing, weight-loading errors."""
import dataclasses
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from featinv.config import BACKBONE_HELP, BACKBONE_PRESETS, PRESETS, BackboneConfig
from featinv.nets.backbone import FeatureExtractor, build_backbone

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
RESNET18 = BackboneConfig(name="resnet18", pretrained=False, image_size=64)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_backbone(RESNET18)


def test_tiny_preset_backbone_builds():
    assert PRESETS["tiny"].backbone == RESNET18


def test_resnet_final_stage_equals_forward_features(resnet18):
    images = torch.rand(2, 3, 64, 64)
    feats = resnet18(images)
    assert feats.shape == (2, 512, 2, 2)
    assert resnet18.feature_shape == (512, 2, 2)
    # Manual normalisation with the ImageNet constants + timm's own pre-pooling features.
    expected = resnet18.model.forward_features((images - IMAGENET_MEAN) / IMAGENET_STD)
    torch.testing.assert_close(feats, expected)
    assert torch.allclose(resnet18.mean, IMAGENET_MEAN) and torch.allclose(resnet18.std, IMAGENET_STD)


def test_intermediate_layer():
    fe = build_backbone(dataclasses.replace(RESNET18, layer=-2))
    assert fe(torch.rand(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    with pytest.raises(ValueError, match="backbone.layer=7"):
        build_backbone(dataclasses.replace(RESNET18, layer=7))


def test_classify_uses_normalised_images(resnet18):
    images = torch.rand(2, 3, 64, 64)
    logits = resnet18.classify(images)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, resnet18.model((images - IMAGENET_MEAN) / IMAGENET_STD))


def test_frozen_and_eval_after_train(resnet18):
    assert not any(p.requires_grad for p in resnet18.parameters())
    resnet18.train()
    assert resnet18.training and not resnet18.model.training
    assert not any(m.training for m in resnet18.model.modules())
    resnet18.eval()


def test_wrong_image_size_is_an_error(resnet18):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*\(1, 3, 32, 32\)"):
        resnet18(torch.rand(1, 3, 32, 32))


def test_vit_grid_drops_prefix_token():
    torch.manual_seed(0)
    fe = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, image_size=64))
    assert fe.model.num_prefix_tokens == 1
    assert torch.allclose(fe.mean, torch.full((1, 3, 1, 1), 0.5))  # from the ViT's pretrained cfg
    images = torch.rand(2, 3, 64, 64)
    feats = fe(images)
    assert feats.shape == (2, 192, 4, 4) and fe.feature_shape == (192, 4, 4)
    tokens = fe.model.forward_features((images - 0.5) / 0.5)  # (B, 1 + 16, 192), final norm applied
    expected = tokens[:, 1:].transpose(1, 2).reshape(2, 192, 4, 4)  # row-major patch grid
    torch.testing.assert_close(feats, expected)


@pytest.mark.parametrize("preset, shape", [("convnext_base", (1024, 9, 9)), ("resnet50", (2048, 7, 7)),
                                           ("swinv2", (1024, 8, 8)), ("vit", (768, 14, 14))])
def test_paper_presets_feature_shapes(preset, shape):
    cfg = dataclasses.replace(BACKBONE_PRESETS[preset], pretrained=False)
    assert timm.is_model(cfg.name) and cfg.name in timm.list_models(pretrained=True)
    with torch.device("meta"):  # shapes only: no memory, no FLOPs
        fe = build_backbone(cfg)
    assert fe.feature_shape == shape
    assert "x".join(map(str, shape)) in BACKBONE_HELP[preset] and f"{cfg.image_size} px" in BACKBONE_HELP[preset]


def test_user_module_with_feature_fn():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5))
    fe = FeatureExtractor(net, lambda model, x: model[0](x), mean=(0.5,) * 3, std=(0.25,) * 3,
                          image_size=32)
    images = torch.rand(2, 3, 32, 32)
    assert fe(images).shape == (2, 8, 8, 8) and fe.feature_shape == (8, 8, 8)
    torch.testing.assert_close(fe(images), net[0]((images - 0.5) / 0.25))
    assert fe.classify(images).shape == (2, 5)
    assert not any(p.requires_grad for p in fe.parameters())


def test_token_features_are_rejected():
    net = nn.Conv2d(3, 8, 4, stride=4)
    fe = FeatureExtractor(net, lambda model, x: model(x).flatten(2).transpose(1, 2),
                          mean=(0.5,) * 3, std=(0.5,) * 3, image_size=16)
    with pytest.raises(ValueError, match=r"\(B, N, C\) tokens.*NCHW"):
        fe(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="forward_intermediates"):
        FeatureExtractor(net, None, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=16)


def test_pretrained_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads these at import, so patch the module constants as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match=r"resnet18\.a1_in1k[\s\S]*backbone\.checkpoint="):
        build_backbone(dataclasses.replace(RESNET18, pretrained=True))


def test_local_checkpoint(tmp_path, resnet18):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18.model.state_dict().items()}, str(path))
    fe = build_backbone(dataclasses.replace(RESNET18, checkpoint=str(path)))
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(fe(images), resnet18(images))

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors"):
        build_backbone(dataclasses.replace(RESNET18, checkpoint=str(tmp_path / "bad.safetensors")))


def test_missing_checkpoint_and_unknown_names(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_backbone(dataclasses.replace(RESNET18, checkpoint=str(missing)))
    with pytest.raises(ValueError, match="not_a_model"):
        build_backbone(BackboneConfig(name="not_a_model", pretrained=False))
    with pytest.raises(ValueError, match="resnet18.no_such_tag"):
        build_backbone(BackboneConfig(name="resnet18.no_such_tag", pretrained=False))


def test_logits_from_features_timm_final_stage(resnet18):
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(resnet18.logits_from_features(resnet18(images)), resnet18.classify(images))
    assert torch.equal(resnet18.head_weight(), resnet18.model.fc.weight)
    with pytest.raises(ValueError, match="not the final stage"):
        build_backbone(dataclasses.replace(RESNET18, layer=-2)).logits_from_features(torch.zeros(1, 256, 4, 4))


def test_logits_from_features_head_fn():
    from featinv.demo.digits import DigitsCNN, make_extractor

    torch.manual_seed(0)
    ext = make_extractor(DigitsCNN().eval(), 8)
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(ext.logits_from_features(ext(images)), ext.classify(images))
    torch.testing.assert_close(ext.head_weight(), ext.model.head.weight)  # Jacobian of pooling + Linear
    no_head = FeatureExtractor(ext.model, lambda m, x: m.features(x), (0.5,) * 3, (0.5,) * 3, 8)
    with pytest.raises(ValueError, match="pass head_fn"):
        no_head.logits_from_features(torch.zeros(1, 64, 2, 2))


def test_random_weights_come_from_the_config_seed():
    """pretrained=false: every process builds the same network, and the caller's RNG is untouched."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_backbone(RESNET18)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)  # another process, another global RNG state
    b = build_backbone(RESNET18)
    c = build_backbone(dataclasses.replace(RESNET18, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.conv1.weight"], sc["model.conv1.weight"])


OFFLINE_SCRIPT = r"""
import sys, time
import torch
from safetensors.torch import save_file
from featinv.nets.backbone import build_backbone
from featinv.config import BackboneConfig

cfg = BackboneConfig(name="resnet18.a1_in1k", pretrained=True, image_size=64)
start = time.monotonic()
try:
    build_backbone(cfg)
    sys.exit("built without weights")
except ValueError as e:
    print(f"{time.monotonic() - start:.2f}s|{e}")
# the same weights in the cache: loaded from there at once
snap = sys.argv[1] + "/hub/models--timm--resnet18.a1_in1k/snapshots/" + "0" * 40
import os; os.makedirs(snap)
weights = build_backbone(BackboneConfig(name="resnet18", pretrained=False, image_size=64)).model.state_dict()
save_file({k: v.contiguous() for k, v in weights.items()}, snap + "/model.safetensors")
os.makedirs(sys.argv[1] + "/hub/models--timm--resnet18.a1_in1k/refs")
open(sys.argv[1] + "/hub/models--timm--resnet18.a1_in1k/refs/main", "w").write("0" * 40)
start = time.monotonic()
model = build_backbone(cfg).model
same = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
print(f"{time.monotonic() - start:.2f}s|cached weights loaded: {same}")
"""


def test_unreachable_hub_fails_fast_or_uses_the_cache(tmp_path):
    """No network, HF_HUB_OFFLINE unset: no minute of download retries."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (t_fail, error), (t_cached, cached) = [ln.split("|", 1) for ln in proc.stdout.strip().splitlines()[-2:]]
    assert float(t_fail[:-1]) < 10 and "resnet18.a1_in1k" in error and "backbone.checkpoint=" in error
    assert float(t_cached[:-1]) < 10 and cached == "cached weights loaded: True"
