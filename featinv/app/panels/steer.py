"""Steer: move the feature map along a class or channel direction over a strip of strengths, reconstructed
with the same noise, so that only the steering differs."""
from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd
import torch

from featinv.analysis import steering
from featinv.app.session import CLAMPS, Session, number
from featinv.app.show import KEY, MAX_STRENGTH, STRIP, classify, label, no_progress, region_mask, tile
from featinv.app.widgets import Panel, Shared, Wiring, gallery, region_inputs
from featinv.config import STEER_CLAMP, SampleConfig


def direction(session: Session, kind: str, class_name: str, channel) -> tuple[torch.Tensor, str]:
    """The steering direction (C,) chosen in the page and its name."""
    if kind == "class":
        if class_name not in session.class_names:
            raise ValueError(f"class {class_name!r} is not one of the classifier's classes")
        cls = session.class_names.index(class_name)
        return steering.class_direction(session.extractor, cls).to(session.device), f"class {class_name}"
    if kind == "channel":
        c = session.extractor.feature_shape[0]
        index = int(number(channel, "channel", 0, c - 1, whole=True))
        return steering.channel_direction(c, index).to(session.device), f"channel {index}"
    raise ValueError(f"direction {kind!r}: choose class or channel")


def run(session: Session, path: str | None, kind: str, class_name: str, channel, strength, clamp: str,
        region: str, coords: str, *, cfg: SampleConfig, progress=no_progress):
    """A strip over strengths 0..``strength`` (units of the map's mean feature norm, see
    ``featinv.analysis.steering``), one sample each -> (the captioned strip, a table per strength: the head's
    top-1 on the steered map and the classifier's on the reconstruction).

    clamp (a key of :data:`featinv.app.session.CLAMPS`): keep the edited entries inside the range of
    features the backbone produces (:meth:`Session.feature_range`); without it a strong edit leaves that
    range (negative values after a ReLU) and the reconstructions stop following it."""
    image = session.load_image(path)
    d, name = direction(session, kind, class_name, channel)
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    mask = region_mask(session, region, coords)
    alphas = torch.linspace(0, strength, STRIP).tolist()
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))  # one sample per strength
    feats = rec.features(image)
    bounds = session.feature_range(clamp, feats)
    progress(0.1, f"steering along {name}: {STRIP} strengths")
    with torch.no_grad():
        steered = steering.steer(feats, d, alphas, mask=mask, clamp=bounds)        # (1, A, C, h, w)
        map_probs = session.extractor.logits_from_features(steered[0]).float().softmax(dim=-1)
    samples = steering.steer_and_reconstruct(rec, feats, d, alphas, [KEY], steered=steered)  # (1, A, 1, 3, H, W)
    progress(0.9, "classifying")
    _, probs = classify(session, samples[0, :, 0])
    strip = [(tile(samples[0, a, 0]), f"α {alpha:+.2f}: {label(session, probs[a])}") for a, alpha in enumerate(alphas)]
    table = pd.DataFrame({"strength α": [f"{a:+.2f}" for a in alphas],
                          f"head on the map steered along {name}": [label(session, p) for p in map_probs],
                          "classifier on the reconstruction": [label(session, p) for p in probs]})
    return strip, table


def build(shared: Shared) -> Wiring:
    session, names = shared.session, shared.session.class_names
    with gr.Row():
        kind = gr.Radio(["class", "channel"], value="class", label="direction", elem_id="steer-kind")
        cls = gr.Dropdown(names, value=names[0], label="class (head weight)", elem_id="steer-class")
        channel = gr.Number(value=0, precision=0, minimum=0, maximum=session.extractor.feature_shape[0] - 1,
                            label="channel", elem_id="steer-channel")
    strength = gr.Slider(-MAX_STRENGTH, MAX_STRENGTH, value=2, step=0.25, elem_id="steer-strength",
                         label="strength (units of the map's mean feature norm); the strip runs 0..strength")
    default = next(name for name, kind in CLAMPS.items() if kind == STEER_CLAMP)
    clamp = gr.Radio(list(CLAMPS), value=default, elem_id="steer-clamp",
                     label="clamp edited features to the backbone's range (min/max over reference images); "
                           "without it strong edits leave that range and the reconstructions stop following them")
    region, coords = region_inputs("steer", session)
    go = gr.Button("Steer", variant="primary", elem_id="steer-run")
    strip = gallery("reconstructions over strengths 0..strength (caption: the classifier's top-1)", STRIP,
                    "steer-strip")
    table = gr.Dataframe(headers=["strength α", "head on the steered map", "classifier on the reconstruction"],
                         label="top-1 per strength", interactive=False, elem_id="steer-table")
    # moving the slider redraws the strip
    return Wiring([go.click, strength.release], [shared.upload, kind, cls, channel, strength, clamp, region, coords],
                  [strip, table])


PANEL = Panel(run, build)
