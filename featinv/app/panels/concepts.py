"""Concepts: one concept of a basis written by ``featinv concepts``: where it sits in the input, an edit of it
(a steering strip along its atom, its code set to a level, or a swap of it for another concept), the
reconstruction without it; the concepts active at a clicked place, and the basis's concepts found by class or
frequency (:mod:`featinv.app.concept_lookup`)."""
from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd
import torch

from featinv.analysis import concept_edits, steering
from featinv.app import concept_lookup
from featinv.app.session import Session, number
from featinv.app.show import KEY, MAX_STRENGTH, STRIP, classify, display_factor, label, no_progress, tile
from featinv.app.widgets import Panel, Shared, Wiring, gallery, run_on, user_errors
from featinv.config import EDIT_DEFAULTS, SampleConfig
from featinv.visualize import heatmap

MODES = {"steer along the atom": "steer", "set the code": "set", "swap a → b": "swap"}
QUANTILE = EDIT_DEFAULTS["set"][0]  # set / swap's level: this quantile of a concept's non-zero codes, as featinv steer
QUANTILE_RANGE = (0.5, 0.99)


def _overlay(image01: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """(3, S, S) image and (S, S) heat >= 0 -> the image with the heat map laid over it (at most 60 %)."""
    vmax = float(heat.max())
    weight = (heat / vmax).clamp(0, 1) * 0.6 if vmax > 0 else torch.zeros_like(heat)
    return image01 * (1 - weight) + heatmap(heat, vmax=vmax) * weight


def _code_edit(session: Session, basis, feats, codes, i: int, mode: str, quantile: float, target):
    """The set / swap edit of concept i -> (the edited map (1, C, h, w), what it did, for the caption)."""
    levels = concept_lookup.levels(session, basis, feats, quantile)
    if mode == "set":
        level = float(levels[i])
        return concept_edits.set_code(feats, basis, i, level, codes=codes), f"concept {i} set to {level:.3g}"
    b = int(number(target, "concept b", 0, basis.k - 1, whole=True))
    if b == i:
        raise ValueError(f"swap: concept b = {b} is concept a; choose another concept")
    return (concept_edits.swap(feats, basis, i, b, levels, codes=codes),
            f"concept {i} set to 0, {b} to {float(levels[b]):.3g}")


def run(session: Session, path: str | None, basis_path: str | None, index, mode: str, strength, quantile, target,
        *, cfg: SampleConfig, progress=no_progress):
    """-> (the input with concept ``index``'s code over the grid laid over it, the edit, the reconstruction and the
    one without the concept, a table per concept: its code on this image and the head's top-1 without it); one
    sample each, the same noise.

    The edit (``mode``, a key of :data:`MODES`): steer: the strip along the concept's atom over strengths
    0..``strength``; set: its code set to the ``quantile`` of its non-zero codes on the reference maps
    (:func:`featinv.app.concept_lookup.levels`) everywhere, each location's residual kept; swap: its code set to 0
    and concept ``target``'s to that level. set and swap show the reconstruction before and after, captioned with
    the classifier's top-1 and the head's on the edited map."""
    image = session.load_image(path)
    basis = concept_lookup.load_basis(basis_path)
    i = int(number(index, "concept", 0, basis.k - 1, whole=True))
    if mode not in MODES:
        raise ValueError(f"edit {mode!r}: choose one of {', '.join(MODES)}")
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    quantile = number(quantile, "quantile", *QUANTILE_RANGE)
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))
    feats = rec.features(image)
    codes = basis.encode(feats)                                                   # (1, k, h, w)
    heat = concept_edits.heat_map(codes, i, image.shape[-1])[0].cpu()
    progress(0.1, f"editing concept {i}")
    if MODES[mode] == "steer":
        alphas = torch.linspace(0, float(strength), STRIP).tolist()
        samples = steering.steer_and_reconstruct(rec, feats, concept_edits.concept_direction(basis, i), alphas, [KEY])
        edited, what = None, [f"α {alpha:+.2f}" for alpha in alphas]
    else:
        edited, did = _code_edit(session, basis, feats, codes, i, MODES[mode], quantile, target)
        samples = rec.from_features(edited.to(feats.dtype), [KEY])                 # (1, 1, 3, H, W)
        what = [f"after ({did})"]
    progress(0.6, f"removing concept {i}")
    with torch.no_grad():
        without = [concept_edits.remove(feats, basis, j, codes) for j in range(basis.k)]
        head = session.extractor.logits_from_features(torch.cat(without)).float().softmax(dim=-1)
    pair = rec.from_features(torch.cat([feats, without[i]]), [KEY, KEY])           # (2, 1, 3, H, W)
    edits = samples[0, :, 0] if edited is None else samples[:, 0]                  # (E, 3, H, W)
    _, probs = classify(session, torch.cat([edits, pair[:, 0]]))
    n = len(edits)
    strip = [(tile(edits[e]), f"{what[e]}: {label(session, probs[e])}") for e in range(n)]
    if edited is not None:
        with torch.no_grad():
            on_map = session.extractor.logits_from_features(edited.to(feats.dtype)).float().softmax(dim=-1)[0]
        strip = [(tile(pair[0, 0]), f"before: {label(session, probs[n])}"),
                 (strip[0][0], f"{strip[0][1]}; head on the edited map {label(session, on_map)}")]
    removed = [(tile(pair[0, 0]), f"reconstruction: {label(session, probs[n])}"),
               (tile(pair[1, 0]), f"without concept {i}: {label(session, probs[n + 1])}")]
    peak = codes.amax(dim=(2, 3))[0]
    table = pd.DataFrame({"concept": [str(j) for j in range(basis.k)],
                          "code on this image (max over the grid)": [f"{float(v):.2f}" for v in peak],
                          "head on the map without it": [label(session, p) for p in head]})
    return tile(_overlay(image[0].cpu(), heat)), strip, removed, table


def _lookups(shared: Shared, basis: gr.File, heat: gr.Image) -> None:
    """The look-ups that sample nothing, laid out and wired: a click on the picture lists the concepts active
    there; Find filters the basis's concepts by class and frequency (its index)."""
    session = shared.session
    at_note = gr.Markdown(elem_id="concepts-at-note")
    at_table = gr.Dataframe(headers=["concept", "code here", "active at", "top classes"],
                            label="concepts active at the clicked place", interactive=False, elem_id="concepts-at")
    with gr.Row():
        cls = gr.Textbox(label="find: class (name or index; empty: any)", elem_id="concepts-class")
        low = gr.Number(value=0, minimum=0, maximum=1, label="active at: share of fit locations from",
                        elem_id="concepts-freq-low")
        high = gr.Number(value=1, minimum=0, maximum=1, label="to", elem_id="concepts-freq-high")
        find = gr.Button("Find concepts", elem_id="concepts-find")
    found_note = gr.Markdown(elem_id="concepts-found-note")
    found = gr.Dataframe(headers=["concept", "active at", "top classes", "mean code", "importance"],
                         label="concepts found", interactive=False, elem_id="concepts-found")

    def concepts_at(path, basis_path, evt: gr.SelectData):
        with user_errors():
            if evt.index is None:
                raise ValueError("click inside the picture")
            factor = display_factor(session.image_size)  # the picture is the S x S input enlarged by factor
            return concept_lookup.at(session, path, basis_path, evt.index[0] / factor, evt.index[1] / factor)

    def concepts_found(basis_path, class_text, lo, hi):
        with user_errors():
            return concept_lookup.find(session, basis_path, class_text, lo, hi)

    run_on(heat.select, concepts_at, [shared.upload, basis], [at_table, at_note])
    for trigger in (find.click, cls.submit):
        run_on(trigger, concepts_found, [basis, cls, low, high], [found, found_note])


def build(shared: Shared) -> Wiring:
    gr.Markdown("The basis: a `concepts.safetensors` written by `featinv concepts` (its atlas shows what each "
                "concept is). Click the picture to list the concepts active at that place.")
    with gr.Row():
        basis = gr.File(label="concept basis (concepts.safetensors)", type="filepath", elem_id="concepts-basis")
        index = gr.Number(value=0, precision=0, minimum=0, label="concept (a)", elem_id="concepts-index")
        target = gr.Number(value=1, precision=0, minimum=0, label="concept b (swap)", elem_id="concepts-target")
    with gr.Row():
        mode = gr.Radio(list(MODES), value=next(iter(MODES)), label="edit", elem_id="concepts-mode")
        strength = gr.Slider(-MAX_STRENGTH, MAX_STRENGTH, value=2, step=0.25, elem_id="concepts-strength",
                             label="steering strength (units of the map's mean feature norm); "
                                   "the strip runs 0..strength")
        quantile = gr.Slider(*QUANTILE_RANGE, value=QUANTILE, step=0.01, elem_id="concepts-quantile",
                             label="set / swap: the level, a quantile of the concept's non-zero codes on the "
                                   "reference images")
    go = gr.Button("Show concept", variant="primary", elem_id="concepts-run")
    with gr.Row():
        heat = gr.Image(label="the concept's code (heat); click: the concepts there",
                        format="png", interactive=False, elem_classes=["pixelated"], height=200,
                        elem_id="concepts-heat")
        removed = gallery("reconstruction, and without the concept", 2, "concepts-removed")
    strip = gallery("the edit: steered along the concept (strengths 0..strength), or before and after set / swap",
                    STRIP, "concepts-strip")
    _lookups(shared, basis, heat)
    table = gr.Dataframe(headers=["concept", "code on this image", "head on the map without it"],
                         label="every concept of the basis on this image", interactive=False, elem_id="concepts-table")
    return Wiring([go.click, strength.release, quantile.release],
                  [shared.upload, basis, index, mode, strength, quantile, target], [heat, strip, removed, table])


PANEL = Panel(run, build)
