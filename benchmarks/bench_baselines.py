"""The paper's claim on the demo pair: spatial vs pooled conditioning, against training-free baselines.

    cp -r featinv_demo /tmp/demo && python benchmarks/bench_baselines.py --demo-out /tmp/demo   # ~10 min, 2-core CPU

One run, one classifier (the quick demo pair's), the same held-out digits and seeds for every method:
spatial FeatInv (the demo's model), pooled FeatInv (``model.adapter.pooled=true``, trained with the
demo's control stage and budget from the same initial checkpoint; cached in its own folder
``<demo-out>/cache/<pair cache name>-pooled/``), the unconditional model (feature map dropped),
feature guidance of that unconditional model and of the plain UNet (the miniSD stand-in, no control
branch), and pixel optimisation. Feature cosine and label agreement are what guidance and pixel
optimisation optimise directly, so two measures they do not see are added: the label agreement of an
independent classifier (the demo's architecture trained with another seed) and the pixel RMSE to the
original. Prints a Markdown table (pasted into RESULTS.md) and writes it with
the raw numbers to --out. Counts per reconstruction: UNet evaluations (rows through the UNet;
classifier-free guidance runs two per step), UNet and classifier backward passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from featinv.analysis.baselines import PixelInversionConfig, pixel_inversion
from featinv.checkpoint import load_featinv
from featinv.config import FeatureGuidanceConfig
from featinv.demo import load_demo_pair, metrics
from featinv.demo_stages import QUICK, _stage_control, classifier_accuracy
from featinv.digits import make_extractor, rgb, train_classifier
from featinv.reconstruct import Reconstructor
from featinv.sampling import ddim_timesteps, feature_guided_eps_fn, sample


class Counter:
    """Rows through the UNet and the classifier during a method's run; rows whose output needs a
    gradient are backward passes (every such forward is followed by one in these methods)."""

    def __init__(self, unets: list[torch.nn.Module], classifier: torch.nn.Module):
        self.counts = dict(unet=0, unet_backward=0, classifier_backward=0)
        self.handles = [u.register_forward_hook(self._unet) for u in unets]
        self.handles.append(classifier.register_forward_hook(self._classifier))

    def _unet(self, module, args, out):
        self.counts["unet"] += out.shape[0]
        self.counts["unet_backward"] += out.shape[0] if out.requires_grad else 0

    def _classifier(self, module, args, out):
        self.counts["classifier_backward"] += out.shape[0] if out.requires_grad else 0

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pooled_pair_model(pair, seed: int, log):
    """The pooled model: the demo's control stage, same settings and initial checkpoint, pooled adapter."""
    cache = pair.folder.parent / f"{pair.folder.name}-pooled"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "featinv_init.safetensors").exists():
        shutil.copyfile(pair.folder / "featinv_init.safetensors", cache / "featinv_init.safetensors")
    cfg = pair.model.cfg
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, pooled=True))
    final = _stage_control(cache, pair.data, QUICK, seed, torch.device("cpu"), cfg, pair.extractor, log)
    return load_featinv(final).eval()


def plain_unet_guided(pair, feats, keys, guidance):
    """Feature guidance of the plain UNet (no control branch: what a miniSD-style model offers)."""
    model, sc, ext = pair.model, pair.sample_config, pair.extractor
    rec = Reconstructor(model, ext, sc)  # only for its seeded start noise, shared with the other methods
    x_T, _ = rec.start_noise(keys)
    ctx = model.text_context([sc.prompt]).expand(len(x_T), -1, -1)
    eps_fn = lambda x, t: model(x, t, ctx)  # noqa: E731  (no feature map, no hint: the plain UNet)
    target = feats.repeat_interleave(sc.num_samples, dim=0)
    features = lambda images: ext((images + 1) / 2)  # noqa: E731  decoded [-1, 1] -> the classifier's [0, 1]
    eps_fn = feature_guided_eps_fn(eps_fn, model.decode_latents, features, target, model.alphas_cumprod, guidance)
    latents = sample(sc.sampler, eps_fn, x_T, model.alphas_cumprod, ddim_timesteps(sc.steps, spacing=sc.spacing))
    with torch.no_grad():
        images = ((model.decode_latents(latents) + 1) / 2).clamp(0, 1)
    return images.view(len(keys), sc.num_samples, *images.shape[1:])


def methods(pair, pooled, args) -> dict:
    """name -> fn(feats, keys) -> (n, K, 3, S, S) reconstructions in [0, 1]."""
    sc = pair.sample_config
    uncond = dataclasses.replace(sc, guidance_scale=0.0, uncond="features")  # the feature map dropped
    ext, k = pair.extractor, sc.num_samples
    out = {
        "FeatInv, spatial map (the demo's model)": lambda f, ks: Reconstructor(pair.model, ext, sc).from_features(f, ks),
        "FeatInv, pooled vector (same budget)": lambda f, ks: Reconstructor(pooled, ext, sc).from_features(f, ks),
        "unconditional (feature map dropped)": lambda f, ks: Reconstructor(pair.model, ext, uncond).from_features(f, ks),
    }
    for s in args.guidance:
        g = FeatureGuidanceConfig(scale=s)
        out[f"unconditional + feature guidance, s = {s:g}"] = (
            lambda f, ks, g=g: Reconstructor(pair.model, ext, uncond, guidance=g).from_features(f, ks))
    g = FeatureGuidanceConfig(scale=args.guidance[-1])
    out[f"plain UNet (miniSD stand-in) + feature guidance, s = {g.scale:g}"] = (
        lambda f, ks: plain_unet_guided(pair, f, ks, g))
    for steps in args.pixel_steps:
        cfg = PixelInversionConfig(steps=steps)

        def pixels(f, ks, cfg=cfg):
            gen = torch.Generator().manual_seed(int(sc.seed))
            images, _ = pixel_inversion(ext, f.repeat_interleave(k, dim=0), ext.image_size, cfg, gen)
            return images.view(len(ks), k, *images.shape[1:])
        out[f"pixel optimisation, {steps} Adam steps"] = pixels
    return out


@torch.no_grad()
def unseen_measures(judge, originals: torch.Tensor, recon: torch.Tensor) -> dict:
    """What no method optimises: an independent classifier's label agreement and the pixel RMSE."""
    k = recon.shape[1]
    labels = judge.classify(originals).argmax(1).repeat_interleave(k)
    agree = (judge.classify(recon.flatten(0, 1)).argmax(1) == labels).float().mean().item()
    rmse = (recon - originals[:, None]).square().mean(dim=(2, 3, 4)).sqrt().mean().item()
    return {"independent_agreement": agree, "pixel_rmse": rmse}


def markdown(results: dict) -> str:
    lines = ["| method | feature cosine (spatial) | feature cosine (pooled) | label agreement | independent "
             "classifier agreement | pixel RMSE | s / reconstruction | UNet evaluations | UNet backward | "
             "classifier backward |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['feature_cosine_spatial']:.3f} | {r['feature_cosine_pooled']:.3f} | "
                     f"{100 * r['label_agreement']:.1f} % | {100 * r['independent_agreement']:.1f} % | "
                     f"{r['pixel_rmse']:.3f} | {r['seconds_per_reconstruction']:.4f} | "
                     f"{r['unet']:g} | {r['unet_backward']:g} | {r['classifier_backward']:g} |")
    return "\n".join(lines) + (f"\n\n{results['digits']} held-out digits x {results['samples']} samples, seed "
                               f"{results['seed']}; counts per reconstruction; classifier test accuracy "
                               f"{100 * results['classifier_accuracy']:.1f} % (independent: {100 * results['judge_accuracy']:.1f} %).\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", default="featinv_demo", help="the demo's out folder (pooled model cached beside)")
    p.add_argument("--seed", type=int, default=0, help="the demo pair's seed (also its sampling seed)")
    p.add_argument("--digits", type=int, default=0, help="held-out digits (0: the quick demo's number)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 10.0, 30.0], help="feature guidance scales")
    p.add_argument("--pixel-steps", type=int, nargs="+", default=[100, 500], help="pixel optimisation steps")
    p.add_argument("--out", default="bench_baselines")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    pair = load_demo_pair(args.demo_out, seed=args.seed, log=log)
    pooled = pooled_pair_model(pair, args.seed, log)
    n = args.digits or QUICK.eval_digits
    originals = rgb(pair.data["x_test"][:n])
    keys = [f"test{i}" for i in range(n)]
    with torch.no_grad():
        feats = pair.extractor(originals)
    judge = make_extractor(train_classifier(pair.data, QUICK.classifier_epochs, args.seed + 1, torch.device("cpu")),
                           QUICK.image_size).eval()
    with torch.no_grad():
        judge_acc = (judge.classify(rgb(pair.data["x_test"])).argmax(1) == pair.data["y_test"]).float().mean().item()
    counter = Counter([pair.model.unet, pooled.unet], pair.extractor)
    rows = []
    k = pair.sample_config.num_samples
    runs = methods(pair, pooled, args)
    for fn in runs.values():  # warm-up, untimed: the first calls pay for allocations and kernel choices
        fn(feats[:1], keys[:1])
    for name, fn in runs.items():
        counter.reset()
        start = time.perf_counter()
        recon = fn(feats, keys)
        seconds = time.perf_counter() - start
        counts = {c: v / (n * k) for c, v in counter.counts.items()}
        row = {"method": name, **metrics(pair.extractor, originals, recon), **unseen_measures(judge, originals, recon),
               "seconds_per_reconstruction": seconds / (n * k), **counts}
        rows.append(row)
        log(f"  {name}: {row}")
    counter.remove()
    results = {"rows": rows, "digits": n, "samples": k, "seed": args.seed,
               "classifier_accuracy": classifier_accuracy(pair.extractor, pair.data), "judge_accuracy": judge_acc, "guidance": args.guidance,
               "pixel_steps": args.pixel_steps, "threads": args.threads}
    md = markdown(results)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_baselines.md").write_text(md)
    (out / "bench_baselines.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
