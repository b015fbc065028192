"""Compose: interpolate two images' feature maps, paste a region of B's into the result, reconstruct it."""
from __future__ import annotations

import gradio as gr
import torch

from featinv.analysis import compose
from featinv.app.session import Session, number
from featinv.app.show import KEY, NBSP, classify, label, no_progress, region_mask, tile, topk_table
from featinv.app.widgets import Panel, Shared, Wiring, gallery, image_upload, region_inputs, top5_table
from featinv.config import SampleConfig


def run(session: Session, path_a: str | None, path_b: str | None, t, region: str, coords: str, *,
        cfg: SampleConfig, progress=no_progress):
    """(1 − t)·A + t·B, then B's feature cells pasted into the region -> (A, B and K captioned reconstructions
    of that map, the top-5 table of the head on the map and the classifier on each reconstruction, a note
    with their mean feature cosine to the composed map)."""
    image_a, image_b = session.load_image(path_a, "image A"), session.load_image(path_b, "image B")
    t = number(t, "interpolation t", 0, 1)
    rec = session.reconstructor(cfg)
    fa, fb = rec.features(image_a), rec.features(image_b)
    target = compose.interpolate(fa, fb, [t])[:, 0]                           # (1, C, h, w)
    mask = region_mask(session, region, coords)
    if mask is not None:
        target = compose.paste(target, fb, mask.to(target))
    progress(0.1, f"sampling {cfg.num_samples} reconstructions of the composite")
    samples = rec.from_features(target, [KEY])[0]                                 # (K, 3, H, W)
    progress(0.9, "classifying")
    rec_feats, probs = classify(session, samples)
    cosine = compose.feature_cosine(rec_feats, target.expand_as(rec_feats)).tolist()
    with torch.no_grad():
        target_probs = session.extractor.logits_from_features(target).float().softmax(dim=-1)
    _, input_probs = classify(session, torch.cat([image_a, image_b]))
    images = [(tile(image_a[0]), f"A: {label(session, input_probs[0])}"),
              (tile(image_b[0]), f"B: {label(session, input_probs[1])}")]
    images += [(tile(s), f"sample {i + 1}: {label(session, p)}, cos{NBSP}{c:.3f}")
               for i, (s, p, c) in enumerate(zip(samples, probs, cosine))]
    table = topk_table(session, torch.cat([target_probs, probs]),
                       ["composed map (head)"] + [f"sample {i + 1}" for i in range(len(samples))])
    return images, table, f"Feature cosine to the composed map: mean {sum(cosine) / len(cosine):.3f}."


def build(shared: Shared) -> Wiring:
    upload_b = image_upload("image B (A is the shared input)", "upload-b")
    if shared.session.examples:
        gr.Examples(shared.session.examples, inputs=upload_b, label="examples for B", examples_per_page=10,
                    elem_id="examples-b")
    t = gr.Slider(0, 1, value=0.5, step=0.05, label="interpolation t: (1 - t) A + t B", elem_id="compose-t")
    region, coords = region_inputs("compose", shared.session)
    gr.Markdown("The region (if any) is pasted from B's feature map into the interpolated map.")
    go = gr.Button("Compose", variant="primary", elem_id="compose-run")
    images = gallery("A, B and reconstructions of the composed map", 6, "compose-gallery")
    table = top5_table("top-5: the head on the composed map, the classifier on each reconstruction",
                       "compose-table", ["composed map (head)", "sample 1"])
    note = gr.Markdown(elem_id="compose-cosine")
    return Wiring([go.click], [shared.upload, upload_b, t, region, coords], [images, table, note])


PANEL = Panel(run, build)
