"""Concepts: one concept of a basis written by ``featinv concepts``: where it sits in the input, a steering
strip along it, and the reconstruction without it."""
from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd
import torch

from featinv.analysis import concept_edits, steering
from featinv.analysis.concepts import ConceptBasis
from featinv.app.session import Session, number
from featinv.app.show import KEY, MAX_STRENGTH, STRIP, classify, label, no_progress, tile
from featinv.app.widgets import Panel, Shared, Wiring, gallery
from featinv.config import SampleConfig
from featinv.visualize import heatmap


def _overlay(image01: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """(3, S, S) image and (S, S) heat >= 0 -> the image with the heat map laid over it (at most 60 %)."""
    vmax = float(heat.max())
    weight = (heat / vmax).clamp(0, 1) * 0.6 if vmax > 0 else torch.zeros_like(heat)
    return image01 * (1 - weight) + heatmap(heat, vmax=vmax) * weight


def run(session: Session, path: str | None, basis_path: str | None, index, strength, *, cfg: SampleConfig,
        progress=no_progress):
    """-> (the input with concept ``index``'s code over the grid laid over it, the strip steered along its atom
    over strengths 0..``strength``, the reconstruction and the one without the concept, a table per concept:
    its code on this image and the head's top-1 without it); one sample each, the same noise."""
    image = session.load_image(path)
    if not basis_path:
        raise ValueError("no concept basis: upload a concepts.safetensors written by `featinv concepts`")
    basis = ConceptBasis.load(basis_path)
    i = int(number(index, "concept", 0, basis.k - 1, whole=True))
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))
    feats = rec.features(image)
    codes = basis.encode(feats)                                                   # (1, k, h, w)
    heat = concept_edits.heat_map(codes, i, image.shape[-1])[0].cpu()
    alphas = torch.linspace(0, float(strength), STRIP).tolist()
    progress(0.1, f"steering along concept {i}: {STRIP} strengths")
    samples = steering.steer_and_reconstruct(rec, feats, concept_edits.concept_direction(basis, i), alphas, [KEY])
    progress(0.6, f"removing concept {i}")
    with torch.no_grad():
        without = [concept_edits.remove(feats, basis, j, codes) for j in range(basis.k)]
        head = session.extractor.logits_from_features(torch.cat(without)).float().softmax(dim=-1)
    pair = rec.from_features(torch.cat([feats, without[i]]), [KEY, KEY])           # (2, 1, 3, H, W)
    _, probs = classify(session, torch.cat([samples[0, :, 0], pair[:, 0]]))
    strip = [(tile(samples[0, a, 0]), f"α {alpha:+.2f}: {label(session, probs[a])}") for a, alpha in enumerate(alphas)]
    removed = [(tile(pair[0, 0]), f"reconstruction: {label(session, probs[STRIP])}"),
               (tile(pair[1, 0]), f"without concept {i}: {label(session, probs[STRIP + 1])}")]
    peak = codes.amax(dim=(2, 3))[0]
    table = pd.DataFrame({"concept": [str(j) for j in range(basis.k)],
                          "code on this image (max over the grid)": [f"{float(v):.2f}" for v in peak],
                          "head on the map without it": [label(session, p) for p in head]})
    return tile(_overlay(image[0].cpu(), heat)), strip, removed, table


def build(shared: Shared) -> Wiring:
    gr.Markdown("The basis: a `concepts.safetensors` written by `featinv concepts` (its atlas shows what each "
                "concept is).")
    with gr.Row():
        basis = gr.File(label="concept basis (concepts.safetensors)", type="filepath", elem_id="concepts-basis")
        index = gr.Number(value=0, precision=0, minimum=0, label="concept", elem_id="concepts-index")
        strength = gr.Slider(-MAX_STRENGTH, MAX_STRENGTH, value=2, step=0.25, elem_id="concepts-strength",
                             label="steering strength (units of the map's mean feature norm); "
                                   "the strip runs 0..strength")
    go = gr.Button("Show concept", variant="primary", elem_id="concepts-run")
    with gr.Row():
        heat = gr.Image(label="the concept's code over the grid (heat)", format="png", interactive=False,
                        elem_classes=["pixelated"], height=200, elem_id="concepts-heat")
        removed = gallery("reconstruction, and without the concept", 2, "concepts-removed")
    strip = gallery("steered along the concept: strengths 0..strength", STRIP, "concepts-strip")
    table = gr.Dataframe(headers=["concept", "code on this image", "head on the map without it"],
                         label="every concept of the basis on this image", interactive=False, elem_id="concepts-table")
    return Wiring([go.click, strength.release], [shared.upload, basis, index, strength], [heat, strip, removed, table])


PANEL = Panel(run, build)
