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
original. ``--fine-grid DIR`` runs the same comparison on ``bench_analyses.py``'s 16 px pair (a 4x4
feature map instead of 2x2; trained and cached under DIR on first use), ``--no-baselines`` keeps only
the spatial, pooled and unconditional rows. Prints a Markdown table (pasted into RESULTS.md) and writes it with
the raw numbers to --out. Counts per reconstruction: UNet evaluations (rows through the UNet;
classifier-free guidance runs two per step), UNet and classifier backward passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch
from _common import write_results

from featinv.analysis.baselines import PixelInversionConfig, pixel_inversion
from featinv.checkpoint.load import load_featinv
from featinv.config import FeatureGuidanceConfig
from featinv.demo.digits import make_extractor, rgb, train_classifier
from featinv.demo.pair import load_demo_pair
from featinv.demo.run import metrics
from featinv.demo.stages import QUICK, _stage_control, classifier_accuracy
from featinv.diffusion.guidance import feature_guided_eps_fn
from featinv.diffusion.reconstruct import Reconstructor
from featinv.diffusion.samplers import ddim_timesteps, sample
from featinv.diffusion.schedule import alphas_cumprod
from featinv.metrics import backbone_outputs, compare_outputs


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


def pooled_pair_model(pair, seed: int, log, settings=QUICK):
    """The pooled model: the demo's control stage, same settings and initial checkpoint, pooled adapter."""
    cache = pair.folder.parent / f"{pair.folder.name}-pooled"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "featinv_init.safetensors").exists():
        shutil.copyfile(pair.folder / "featinv_init.safetensors", cache / "featinv_init.safetensors")
    cfg = pair.model.cfg
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, pooled=True))
    final = _stage_control(cache, pair.data, settings, seed, torch.device("cpu"), cfg, pair.extractor, log)
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
    eps_fn = feature_guided_eps_fn(eps_fn, model.decode_latents, features, target, alphas_cumprod(model.cfg.diffusion), guidance)
    latents = sample(sc.sampler, eps_fn, x_T, alphas_cumprod(model.cfg.diffusion), ddim_timesteps(sc.steps, spacing=sc.spacing))
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
    if args.no_baselines:
        return out
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


@torch.no_grad()
def per_reconstruction(extractor, originals: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(n·K, 2): each reconstruction's spatial feature cosine and label agreement (0/1)."""
    k = recon.shape[1]
    f0, l0 = backbone_outputs(extractor, originals)
    f1, l1 = backbone_outputs(extractor, recon.flatten(0, 1))
    m = compare_outputs(f0.repeat_interleave(k, dim=0), l0.repeat_interleave(k, dim=0), f1, l1)
    return torch.stack([m["cos_spatial"], m["agree"].float()], dim=1)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Spatial minus pooled, reconstruction by reconstruction (same digit, same start noise): mean ± SE."""
    d = a - b
    mean, se = d.mean(0), d.std(0) / len(d) ** 0.5
    return {"cosine": mean[0].item(), "cosine_se": se[0].item(), "agreement": mean[1].item(), "agreement_se": se[1].item()}


def share_se(p: float, m: int) -> float:
    """The standard error of a share p of m reconstructions: sqrt(p(1-p)/m)."""
    return (p * (1 - p) / m) ** 0.5


def markdown(results: dict) -> str:
    lines = ["| method | feature cosine (spatial) | feature cosine (pooled) | label agreement | independent "
             "classifier agreement | pixel RMSE | s / reconstruction | UNet evaluations | UNet backward | "
             "classifier backward |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    m = results["digits"] * results["samples"]
    for r in results["rows"]:
        agree, indep = r["label_agreement"], r["independent_agreement"]
        lines.append(f"| {r['method']} | {r['feature_cosine_spatial']:.3f} ± {r['feature_cosine_spatial_se']:.3f} | "
                     f"{r['feature_cosine_pooled']:.3f} | {100 * agree:.1f} ± {100 * share_se(agree, m):.1f} % | "
                     f"{100 * indep:.1f} ± {100 * share_se(indep, m):.1f} % | "
                     f"{r['pixel_rmse']:.3f} | {r['seconds_per_reconstruction']:.4f} | "
                     f"{r['unet']:g} | {r['unet_backward']:g} | {r['classifier_backward']:g} |")
    return "\n".join(lines) + (f"\n\n{results['pair']}; "
                               f"{results['digits']} held-out digits x {results['samples']} samples, seed "
                               f"{results['seed']}; counts per reconstruction; classifier test accuracy "
                               f"{100 * results['classifier_accuracy']:.1f} % (independent: {100 * results['judge_accuracy']:.1f} %); "
                               "± one standard error over the reconstructions (a digit's samples are not independent).\n"
                               + "\nSpatial minus pooled, paired by reconstruction: feature cosine {cosine:+.4f} ± {cosine_se:.4f}, "
                               "label agreement {agreement:+.2%} ± {agreement_se:.2%}.\n".format(**results["spatial_minus_pooled"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", default="featinv_demo", help="the demo's out folder (pooled model cached beside)")
    p.add_argument("--seed", type=int, default=0, help="the demo pair's seed (also its sampling seed)")
    p.add_argument("--digits", type=int, default=0, help="held-out digits (0: the quick demo's number)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 10.0, 30.0], help="feature guidance scales")
    p.add_argument("--pixel-steps", type=int, nargs="+", default=[100, 500], help="pixel optimisation steps")
    p.add_argument("--fine-grid", metavar="DIR", help="use bench_analyses.py's 16 px pair (4x4 feature map), "
                   "trained and cached under DIR on first use, instead of --demo-out's")
    p.add_argument("--no-baselines", action="store_true", help="skip feature guidance and pixel optimisation")
    p.add_argument("--out", default="bench_baselines")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    settings = QUICK
    if args.fine_grid:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_analyses import FINE as settings
    pair = load_demo_pair(args.fine_grid or args.demo_out, seed=args.seed, settings=settings, log=log)
    pooled = pooled_pair_model(pair, args.seed, log, settings)
    n = args.digits or settings.eval_digits
    originals = rgb(pair.data["x_test"][:n])
    keys = [f"test{i}" for i in range(n)]
    with torch.no_grad():
        feats = pair.extractor(originals)
    judge = make_extractor(train_classifier(pair.data, settings.classifier_epochs, args.seed + 1, torch.device("cpu")),
                           settings.image_size).eval()
    with torch.no_grad():
        judge_acc = (judge.classify(rgb(pair.data["x_test"])).argmax(1) == pair.data["y_test"]).float().mean().item()
    counter = Counter([pair.model.unet, pooled.unet], pair.extractor)
    rows = []
    k = pair.sample_config.num_samples
    runs = methods(pair, pooled, args)
    per = {}
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
        per[name] = per_reconstruction(pair.extractor, originals, recon)
        row["feature_cosine_spatial_se"] = (per[name][:, 0].std() / len(per[name]) ** 0.5).item()
        rows.append(row)
        log(f"  {name}: {row}")
    counter.remove()
    pair_name = (f"{settings.image_size} px pair, {tuple(feats.shape[1:])} feature map" if args.fine_grid
                 else "quick demo pair")
    spatial_per, pooled_per = (per[name] for name in list(runs)[:2])
    results = {"rows": rows, "spatial_minus_pooled": paired_difference(spatial_per, pooled_per), "pair": pair_name,
               "digits": n, "samples": k, "seed": args.seed,
               "classifier_accuracy": classifier_accuracy(pair.extractor, pair.data), "judge_accuracy": judge_acc, "guidance": args.guidance,
               "pixel_steps": args.pixel_steps, "threads": args.threads}
    write_results(args.out, "bench_baselines", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
