"""Reconstruct: K reconstructions of the input from its feature map, their spread and the classifier's read-back."""
from __future__ import annotations

import gradio as gr
import torch

from featinv.analysis import compose
from featinv.app.session import Session
from featinv.app.show import KEY, NBSP, classify, label, no_progress, tile, topk_table
from featinv.app.widgets import Panel, Shared, Wiring, gallery, top5_table
from featinv.config import SampleConfig
from featinv.diffusion.reconstruct import uncertainty
from featinv.visualize import heatmap


def run(session: Session, path: str | None, *, cfg: SampleConfig, progress=no_progress):
    """One uploaded image -> (K captioned reconstructions, their per-pixel spread (std, hot colour map), the
    top-5 table of the original and each reconstruction, a note with their feature cosines to the original)."""
    image = session.load_image(path)
    progress(0.05, "feature map")
    rec = session.reconstructor(cfg)
    feats = rec.features(image)
    progress(0.15, f"sampling {cfg.num_samples} reconstructions ({cfg.steps} {cfg.sampler} steps)")
    samples = rec.from_features(feats, [KEY])                       # (1, K, 3, H, W)
    progress(0.9, "classifying")
    rec_feats, rec_probs = classify(session, samples[0])
    _, probs = classify(session, image)
    cosine = compose.feature_cosine(rec_feats, feats.expand_as(rec_feats)).tolist()
    k = cfg.num_samples
    images = [(tile(samples[0, i]), f"sample {i + 1}: {label(session, rec_probs[i])}, cos{NBSP}{cosine[i]:.3f}")
              for i in range(k)]
    spread = tile(heatmap(uncertainty(samples)[0]))
    table = topk_table(session, torch.cat([probs, rec_probs]), ["original"] + [f"sample {i + 1}" for i in range(k)])
    note = (f"Feature cosine of the reconstructions to the original's feature map: "
            f"{', '.join(f'{c:.3f}' for c in cosine)} (mean {sum(cosine) / len(cosine):.3f}).")
    return images, spread, table, note


def build(shared: Shared) -> Wiring:
    go = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-run")
    with gr.Row():
        with gr.Column(scale=3):
            images = gallery("reconstructions (K samples)", 4, "reconstruct-gallery")
        with gr.Column(scale=1, min_width=160):
            spread = gr.Image(label="spread (std)", format="png", interactive=False,
                              elem_classes=["pixelated"], height=200, elem_id="reconstruct-uncertainty")
    table = top5_table("classifier top-5: original and each reconstruction", "reconstruct-table",
                       ["original", "sample 1"])
    note = gr.Markdown(elem_id="reconstruct-cosine")
    return Wiring([go.click], [shared.upload], [images, spread, table, note])


PANEL = Panel(run, build)
