"""The demo: the whole FeatInv recipe on scikit-learn's digits, on a CPU, in minutes.

No miniSD, no ImageNet, no GPU needed. The demo runs the same code paths as a full-scale run,
with tiny configs (the stages are :mod:`featinv.demo.stages`, the data and classifier :mod:`featinv.demo.digits`):

1. trains a small CNN classifier on the 8x8 digits (at their native size, as 3-channel images) --
   the network whose spatial feature map (64 x 2 x 2) is inverted;
2. trains a tiny KL autoencoder (8x8 digits -> 4x4x4 latents) and a tiny UNet with the plain
   epsilon loss -- the stand-in for miniSD (the CLIP text encoder stays randomly initialised
   and frozen; the prompt is constant, so it only has to be a fixed function);
3. saves that as a miniSD checkpoint and builds the FeatInv checkpoint with ``build_control``;
4. trains the control branch on the classifier's feature maps with ``featinv.training.loop.train``;
5. reconstructs held-out digits from their feature maps with ``Reconstructor`` and compares the
   classifier's features / labels of reconstructions with those of the originals, for FeatInv and
   for the unconditional model (feature map dropped), as Markdown + JSON and a picture.

Artefacts are cached in ``<out>/cache/<quick|default>-seed<N>-<settings hash>/``: a second run loads
them instead of training (``--retrain`` starts over).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featinv.config import DEMO_OUT
from featinv.demo.digits import rgb
from featinv.demo.pair import load_demo_pair
from featinv.demo.stages import DemoSettings, classifier_accuracy, settings_for
from featinv.io import atomic_save, atomic_write_text
from featinv.metrics import backbone_outputs, compare_outputs
from featinv.nets.backbone import FeatureExtractor
from featinv.pair import Pair
from featinv.runtime import progress_bar, stderr_line

# ----- evaluation ---------------------------------------------------------------------------------

def metrics(extractor: FeatureExtractor, originals: torch.Tensor, recon: torch.Tensor) -> dict:
    """originals (B, 3, S, S), recon (B, K, 3, S, S) in [0, 1] -> feature cosine and label agreement
    (means over the B·K reconstructions of :func:`featinv.metrics.compare_outputs`)."""
    k = recon.shape[1]
    f0, l0 = backbone_outputs(extractor, originals)
    f1, l1 = backbone_outputs(extractor, recon.flatten(0, 1))
    m = compare_outputs(f0.repeat_interleave(k, dim=0), l0.repeat_interleave(k, dim=0), f1, l1)
    return {"feature_cosine_spatial": m["cos_spatial"].mean().item(),
            "feature_cosine_pooled": m["cos_pooled"].mean().item(),
            "label_agreement": m["agree"].float().mean().item()}


def markdown(results: dict) -> str:
    rows = [("FeatInv (feature map -> image)", results["featinv"]),
            ("unconditional (feature map dropped)", results["unconditional"])]
    lines = ["| | feature cosine (spatial) | feature cosine (pooled) | label agreement |",
             "|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['feature_cosine_spatial']:.3f} | {m['feature_cosine_pooled']:.3f} | "
                     f"{100 * m['label_agreement']:.1f} % |")
    n, k = results["eval_digits"], results["samples"]
    lines.append("")
    lines.append(f"{n} held-out digits x {k} samples; classifier test accuracy {100 * results['classifier_accuracy']:.1f} %; "
                 f"label agreement = the classifier's label on the reconstruction equals its label on the original.")
    return "\n".join(lines) + "\n"


# ----- the pipeline --------------------------------------------------------------------------------

def _reconstruct_held_out(pair: Pair, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5. FeatInv and unconditional reconstructions of held-out digits (cached): (n, K, 3, S, S), (n, 1, 3, S, S)."""
    recon_file = pair.folder / "reconstructions.safetensors"
    if recon_file.exists():
        rec = load_file(recon_file)
        stderr_line(f"reconstructions: cached ({recon_file})")
        return rec["featinv"], rec["unconditional"]
    from featinv.diffusion.reconstruct import Reconstructor

    dev, sc, n = next(pair.model.parameters()).device, pair.sample_config, len(originals)
    keys = [f"test{i}" for i in range(n)]
    rec_fi = Reconstructor(pair.model, pair.extractor, sc)
    # The unconditional model: zero feature map AND empty prompt (what joint dropout trained), no guidance.
    rec_un = Reconstructor(pair.model, pair.extractor, dataclasses.replace(sc, prompt="", guidance_scale=1.0, num_samples=1))
    chunks_fi, chunks_un = [], []
    chunk = 20
    with progress_bar(total=n, desc="reconstructing held-out digits", unit="digit") as bar:
        for i in range(0, n, chunk):
            feats = rec_fi.features(originals[i:i + chunk].to(dev))
            chunks_fi.append(rec_fi.from_features(feats, keys[i:i + chunk]).cpu())
            chunks_un.append(rec_un.from_features(torch.zeros_like(feats), keys[i:i + chunk]).cpu())
            bar.update(len(feats))
    featinv_rec, uncond_rec = torch.cat(chunks_fi), torch.cat(chunks_un)
    atomic_save(lambda tmp: save_file({"featinv": featinv_rec.contiguous(), "unconditional": uncond_rec.contiguous()},
                                      tmp), recon_file)
    return featinv_rec, uncond_rec


def _write_report(out: Path, results: dict, pair: Pair, s: DemoSettings, originals: torch.Tensor, featinv_rec: torch.Tensor,
                  uncond_rec: torch.Tensor) -> Path:
    """6. the picture (one digit per class) and the table; returns the picture's path."""
    from featinv.visualize import image_grid, save_png

    labels = pair.data["y_test"][:len(originals)]
    show = torch.tensor([int((labels == c).nonzero()[0]) for c in range(10) if (labels == c).any()])
    rows = [originals[show]] + [featinv_rec[show, k] for k in range(s.samples)] + [uncond_rec[show, 0]]
    picture = save_png(image_grid(torch.stack(rows), size=48), out / "demo.png")
    atomic_write_text(
        "# featinv demo: inverting a digits classifier's feature map\n\n" + markdown(results)
        + f"\nPicture: `demo.png` -- row 1: held-out originals; rows 2-{1 + s.samples}: FeatInv reconstructions "
          f"from the classifier's {tuple(pair.extractor.feature_shape)} feature map ({s.samples} samples); "
          f"last row: unconditional samples (feature map dropped).\n", out / "results.md")
    atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    return picture


def run(out: str | Path = DEMO_OUT, quick: bool = False, seed: int = 0, device: str = "cpu",
        retrain: bool = False, settings: DemoSettings | None = None) -> dict:
    """Run (or reuse) every stage; returns the results dict (also written to ``<out>/results.json``)."""
    t0 = time.time()
    out = Path(out)
    pair = load_demo_pair(out, seed, quick, device, retrain=retrain, settings=settings)
    s, dev = settings_for(quick, settings), pair.device
    n = min(s.eval_digits, len(pair.data["y_test"]))
    originals = rgb(pair.data["x_test"][:n])
    featinv_rec, uncond_rec = _reconstruct_held_out(pair, originals)
    results = {"featinv": metrics(pair.extractor, originals.to(dev), featinv_rec.to(dev)),
               "unconditional": metrics(pair.extractor, originals.to(dev), uncond_rec.to(dev)),
               "classifier_accuracy": classifier_accuracy(pair.extractor, pair.data), "eval_digits": n, "samples": s.samples, "seed": seed,
               "quick": quick, "settings": dataclasses.asdict(s)}
    picture = _write_report(out, results, pair, s, originals, featinv_rec, uncond_rec)
    results["seconds"] = time.time() - t0
    print(markdown(results))
    print(f"picture: {picture}  (row 1 originals, rows 2-{1 + s.samples} FeatInv samples, last row unconditional)")
    print(f"table:   {out / 'results.md'}, {out / 'results.json'}   ({results['seconds']:.0f} s)")
    return results
