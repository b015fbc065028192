"""Parity with a second implementation: tiny random networks built with diffusers / transformers, saved as
a pipeline folder, read by featinv (featinv.checkpoint.diffusers) and compared on the same inputs.

Offline, CPU, tiny configs. diffusers and transformers are test-time dependencies (the ``test`` extra)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_close_rel
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from featinv.checkpoint.build_control import build_control  # noqa: E402
from featinv.checkpoint.diffusers import read_pipeline  # noqa: E402
from featinv.checkpoint.load import load_featinv, load_into  # noqa: E402
from featinv.config import DiffusionConfig  # noqa: E402
from featinv.diffusion.samplers import ddim_sample, ddim_timesteps, dpmpp_2m_sample  # noqa: E402
from featinv.diffusion.schedule import alphas_cumprod  # noqa: E402
from featinv.nets.controlnet import ControlNet  # noqa: E402
from featinv.nets.model import FeatInv  # noqa: E402

TOL = 1e-5
SD1_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No network here: the Hub is offline and its cache an empty folder (set for subprocesses too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norm scales and zero-initialised layers too), so a misplaced tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def make_pipeline(path: Path, attention: bool = True, seed: int = 0) -> dict:
    """A tiny SD-1.x-layout pipeline folder written by diffusers / transformers; returns the networks."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if attention:  # SD-1.x pattern: attention in all but the deepest level, 2 res blocks per level
        unet_kw = dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    else:  # no attention levels (only the middle block's)
        unet_kw = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    nets = {
        "unet": UNet2DConditionModel(sample_size=8, cross_attention_dim=32, attention_head_dim=2, **unet_kw),
        "vae": AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, max_position_embeddings=77)),
    }
    for i, (name, net) in enumerate(nets.items()):
        _perturb(net, seed + i).save_pretrained(path / name)
    DDIMScheduler(**SD1_SCHEDULE).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "tokenizer": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index))
    return nets


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    return path, make_pipeline(path)


def featinv_from(folder: Path) -> FeatInv:
    sd, cfg = read_pipeline(folder)
    model = FeatInv(cfg)
    load_into(model, sd, components=("unet", "vae", "text_encoder"), source=str(folder))
    return model.eval()


def _unet_inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 17]), torch.randn(2, 77, 32, generator=gen))


@torch.no_grad()
@pytest.mark.parametrize("attention", [True, False])
def test_unet_eps_matches_diffusers(pipe, tmp_path, attention):
    folder, nets = pipe if attention else (tmp_path / "p", make_pipeline(tmp_path / "p", attention=False, seed=3))
    model = featinv_from(folder)
    assert bool(model.cfg.unet.attention_resolutions) == attention
    x, t, ctx = _unet_inputs()
    assert_close_rel(model.unet(x, t, ctx), nets["unet"](x, t, encoder_hidden_states=ctx).sample, TOL, "eps")


@torch.no_grad()
def test_vae_and_text_encoder_match(pipe):
    folder, nets = pipe
    model = featinv_from(folder)
    assert model.cfg.vae.ch_mult == (1, 2) and model.cfg.text.layers == 2 and model.cfg.unet.num_heads == 2
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dist = nets["vae"].encode(images).latent_dist
    mean, logvar = model.vae.encode(images)
    assert_close_rel(mean, dist.mean, TOL, "mean")
    assert_close_rel(logvar, dist.logvar, TOL, "logvar")
    assert_close_rel(model.vae.decode(mean), nets["vae"].decode(dist.mean).sample, TOL, "decode")
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    assert_close_rel(model.text_encoder(tokens), nets["text_encoder"](tokens).last_hidden_state, TOL, "context")


@torch.no_grad()
def test_controlnet_trunk_matches_diffusers_from_unet(pipe):
    """Same residuals from the same conditioning embedding. diffusers' own embedding (a conv stack on an
    image) is swapped for the identity: featinv's counterpart is the FeatInv adapter, which diffusers lacks."""
    from diffusers import ControlNetModel

    folder, nets = pipe
    model = featinv_from(folder)
    ours = ControlNet.from_unet(model.unet, model.cfg.adapter).eval()
    _perturb(ours.zero_convs, seed=7), _perturb(ours.middle_block_out, seed=8)  # non-zero "zero" convs
    theirs = ControlNetModel.from_unet(nets["unet"]).eval()
    theirs.controlnet_cond_embedding = torch.nn.Identity()
    pairs = [*zip(ours.zero_convs, theirs.controlnet_down_blocks), (ours.middle_block_out, theirs.controlnet_mid_block)]
    assert len(pairs) == len(theirs.controlnet_down_blocks) + 1
    for zero_conv, target in pairs:  # the same weights in the residual convs, paired by position
        target.load_state_dict(zero_conv[0].state_dict())
    x, t, ctx = _unet_inputs(2)
    hint = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    out = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    residuals = ours(x, hint, t, ctx)
    for i, (a, b) in enumerate(zip(residuals, [*out[0], out[1]], strict=True)):
        assert_close_rel(a, b, TOL, f"residual {i}")


def _eps_fn(seed: int = 0):
    """A fixed, smooth, t-dependent ε-function (the samplers never look inside it)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 4, generator=gen, dtype=torch.float64) / 2
    mix = lambda x: torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)  # noqa: E731
    return lambda x, t: torch.tanh(mix(x)) + (t.to(x.dtype) / 1000)[:, None, None, None]


def _diffusers_trajectory(scheduler, x, eps_fn):
    steps = []
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t.expand(x.shape[0])), t, x).prev_sample
        steps.append(x)
    return steps


def test_ddim_trajectory_matches_diffusers_sd1():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD1_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading")
    sched.set_timesteps(50)
    timesteps = ddim_timesteps(50)  # the reference spacing: arange(0, 1000, 20) + 1
    assert torch.equal(sched.timesteps, timesteps.flip(0))
    ours_ac = alphas_cumprod(DiffusionConfig())  # featinv's own schedule (float64, stored float32)
    assert_close_rel(ours_ac, sched.alphas_cumprod, TOL, "alphas_cumprod")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn = _eps_fn()
    theirs = _diffusers_trajectory(sched, x_T, eps_fn)
    ours = []
    ddim_sample(eps_fn, x_T, ours_ac, timesteps, callback=lambda i, x, x0: ours.append(x))
    assert len(ours) == len(theirs) == 50
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_rel(a, b, TOL, f"DDIM step {i}")


def _dpm_scheduler(**kw):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**SD1_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", **kw)
    sched.set_timesteps(50)
    return sched


def test_dpmpp_2m_matches_diffusers_where_definitions_agree():
    """featinv's DPM-Solver++(2M) ends on ᾱ[0] like DDIM with a second-order last step; that is diffusers'
    ``final_sigmas_type="sigma_min"`` without ``lower_order_final``. diffusers' default ("zero") instead
    takes a first-order last step to σ = 0 and returns that step's x0 prediction: the first 49 steps agree,
    the last one differs (see the README)."""
    timesteps = ddim_timesteps(50, spacing="trailing")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = _eps_fn(1)
    ours, x0s = [], []
    dpmpp_2m_sample(eps_fn, x_T, alphas_cumprod(DiffusionConfig()), timesteps,
                    callback=lambda i, x, x0: (ours.append(x), x0s.append(x0)))
    same = _dpm_scheduler(final_sigmas_type="sigma_min", lower_order_final=False)
    assert torch.equal(same.timesteps, timesteps.flip(0))
    for i, (a, b) in enumerate(zip(ours, _diffusers_trajectory(same, x_T, eps_fn), strict=True)):
        assert_close_rel(a, b, TOL, f"DPM++(2M) step {i}")
    default = _diffusers_trajectory(_dpm_scheduler(), x_T, eps_fn)
    for i in range(49):
        assert_close_rel(ours[i], default[i], TOL, f"DPM++(2M) default, step {i}")
    assert_close_rel(default[-1], x0s[-1], TOL, "diffusers' default returns the last x0 prediction")
    assert (default[-1] - ours[-1]).abs().max() > 1e-3  # ... which is not featinv's sample at ᾱ[0]


# --- build-control / convert from a pipeline folder or a Hub id ------------------------------------------------


@torch.no_grad()
def test_build_control_from_pipeline_folder_keeps_the_unet(pipe, tmp_path, capsys):
    from featinv.commands.build_control import main

    folder, nets = pipe
    out = tmp_path / "init.safetensors"
    assert main([str(folder), str(out), "--hint-channels", "16"]) == 0
    assert str(out) in capsys.readouterr().out
    model = load_featinv(out).eval()  # config (2 heads, 8x8 latents, SD-1.x schedule) from the metadata
    assert model.cfg.unet.num_heads == 2 and model.cfg.latent_size == 8 and model.cfg.adapter.in_channels == 16
    x, t, ctx = _unet_inputs(4)
    expected = nets["unet"](x, t, encoder_hidden_states=ctx).sample
    assert_close_rel(model.unet(x, t, ctx), expected, TOL, "eps after build-control")
    feats = torch.randn(2, 16, 3, 3)
    assert torch.equal(model(x, t, ctx, feats=feats), model.unet(x, t, ctx))  # zero convs: control starts silent


def test_convert_pipeline_to_minisd_file(pipe, tmp_path, capsys):
    from featinv.commands.convert import main

    folder, _ = pipe
    minisd = tmp_path / "minisd.safetensors"
    assert main([str(folder), str(minisd)]) == 0 and "wrote" in capsys.readouterr().out
    sd = load_file(minisd)
    assert {"betas", "model.diffusion_model.out.2.weight", "first_stage_model.decoder.up.1.upsample.conv.weight"} <= set(sd)
    a = build_control(minisd, tmp_path / "a.safetensors", hint_channels=16)
    b = build_control(folder, tmp_path / "b.safetensors", hint_channels=16)
    assert a["copied"] == b["copied"]
    sa, sb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # the file keeps the heads too


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder: Path, component: str, **changes) -> None:
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, message", [
    ("missing_vae", r"model_index\.json lists no vae"),
    ("missing_folder", r"component folder text_encoder/ with config\.json not found"),
    ("heads_per_level", r"unet/config\.json: attention_head_dim = \[2, 4, 4\] is not supported"),
    ("linear_proj", r"unet/config\.json: use_linear_projection = True is not supported"),
    ("new_feature", r"unet/config\.json: field addition_embed_type = 'text' is not supported"),
    ("v_prediction", r"scheduler_config\.json: prediction_type = 'v_prediction' is not supported"),
    ("leftover", r"tensor 'mid_block\.extra\.weight' has no counterpart"),
    ("hub_id_offline", r"someone/no-such-model: .*not in the Hugging Face cache .*offline"),
])
def test_bad_sources_fail_in_one_line_and_write_nothing(pipe, tmp_path, capsys, case, message):
    from featinv.commands.build_control import main

    folder = _copy(pipe[0], tmp_path) if case != "hub_id_offline" else Path("someone/no-such-model")
    if case == "missing_vae":
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
    elif case == "missing_folder":
        shutil.rmtree(folder / "text_encoder")
    elif case == "heads_per_level":
        _edit_config(folder, "unet", attention_head_dim=[2, 4, 4])
    elif case == "linear_proj":
        _edit_config(folder, "unet", use_linear_projection=True)
    elif case == "new_feature":
        _edit_config(folder, "unet", addition_embed_type="text")
    elif case == "v_prediction":
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    elif case == "leftover":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({**load_file(weights), "mid_block.extra.weight": torch.zeros(2)}, weights)
    out = tmp_path / "out" / "init.safetensors"
    assert main([str(folder), str(out), "--hint-channels", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("featinv build-control: error: "), err
    assert __import__("re").search(message, err), err
    assert not out.exists() and not list(tmp_path.glob("out/*"))  # nothing (half-)written


def _populate_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """What snapshot_download leaves in the cache: refs/main -> a commit, snapshots/<commit>/files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@torch.no_grad()
def test_hub_id_from_populated_cache_works_offline(pipe, tmp_path, offline_hub):
    folder, nets = pipe
    _populate_hub_cache(offline_hub, "someone/tiny-sd", folder)
    build_control("someone/tiny-sd", tmp_path / "init.safetensors", hint_channels=16)
    model = load_featinv(tmp_path / "init.safetensors").eval()
    x, t, ctx = _unet_inputs(5)
    assert_close_rel(model.unet(x, t, ctx), nets["unet"](x, t, encoder_hidden_states=ctx).sample, TOL, "eps")


def test_pickled_component_weights_are_read_weights_only(pipe, tmp_path):
    folder = _copy(pipe[0], tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")  # older pipelines ship .bin
    weights.unlink()
    sd, _ = read_pipeline(folder)
    expected, _ = read_pipeline(pipe[0])
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)


def test_dpmpp_2m_lower_order_final_matches_diffusers_below_15_steps():
    """diffusers' lower_order_final (its default, applied below 15 steps) is featinv's option of that name."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**SD1_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", final_sigmas_type="sigma_min")
    sched.set_timesteps(10)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps_fn, ours = _eps_fn(2), []
    dpmpp_2m_sample(eps_fn, x_T, alphas_cumprod(DiffusionConfig()), ddim_timesteps(10, spacing="trailing"),
                    callback=lambda i, x, x0: ours.append(x), lower_order_final=True)
    for i, (a, b) in enumerate(zip(ours, _diffusers_trajectory(sched, x_T, eps_fn), strict=True)):
        assert_close_rel(a, b, TOL, f"step {i}")
