"""Maps: a map inside feature space (FeatMap, ``featinv maps``) from the input's feature map to the map of the same
image manipulated, fitted on the pair's fit images (once per manipulation and map type, kept in the session) or read
from a map file; or, on the demo pair, from its second classifier's map to the decoder's. The mapped map is
reconstructed beside the manipulated image's own map."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from featinv.analysis import maps_report
from featinv.analysis.feature_maps import FeatureMapping
from featinv.analysis.manipulations import MANIPULATIONS, manipulate
from featinv.analysis.map_files import check_map_fits, load_map
from featinv.analysis.specs import parse_manipulation
from featinv.app.session import Session
from featinv.app.show import KEY, classify, label, no_progress, tile
from featinv.app.widgets import Panel, Shared, Wiring, gallery
from featinv.config import MANIPULATION_DEFAULTS, SampleConfig
from featinv.demo.pair import SECOND, second_classifier
from featinv.metrics import cosine_similarity_spatial, read_back
from featinv.registry import MAP_TYPES, names

KINDS = {"linear": "linear", "local (3x3)": "local",  # label -> featinv.registry.MAP_TYPES name
         "global (slow: a transformer trained here, a minute or more on a CPU)": "global"}
MAX_KEPT = 16  # fitted maps kept in the session (the oldest dropped): the value box allows endless specs
FIT_SEED = 0  # the random draws of the fit images' manipulations (jitter, occlude), as featinv maps' --map-seed
COLUMNS = ["feature map", "cosine to the own map", "rel. error to the own map", "head's top-1 on the map",
           "its reconstruction's top-1"]


def _spec(manipulation: str, value) -> str:
    """The dropdown and its value box (empty: the default) -> the canonical spec, "rotate:30"."""
    text = manipulation if value is None or str(value).strip() == "" else f"{manipulation}:{value}"
    name, v = parse_manipulation(str(text))
    return f"{name}:{v:g}"


def _fitted(session: Session, spec: str, kind: str, progress) -> tuple[FeatureMapping, str]:
    """The ``kind`` map from a map to the map after ``spec``, fitted on the pair's fit images (the demo's training
    digits) on first use and kept in ``session.maps`` by (spec, kind) -> (the map, where it came from)."""
    if kind not in MAP_TYPES:
        raise ValueError(f"map type {kind!r}: choose one of {names(MAP_TYPES)}")
    data = session.pair.data
    if data is None:
        raise ValueError(f"fitting a map needs the pair's fit images, and a checkpoint has none: run `featinv maps "
                         f"--checkpoint CKPT --images DIR --manipulation {spec} --map {kind}` first and give its "
                         f"maps/*_{kind}.safetensors as the map file")
    fit = data["x_train"].expand(-1, 3, -1, -1)
    if (spec, kind) not in session.maps:
        progress(0.05, f"fitting a {kind} map for {spec} on {len(fit)} training digits")
        task = maps_report.manipulation_task(session.extractor, spec, fit, fit[:1], [], 0, FIT_SEED)  # no held-out
        fitted = maps_report.fit_task_maps(task, [kind], session.device, **{"global": {"seed": FIT_SEED}})
        session.maps[(spec, kind)] = fitted[kind].to(session.device)
        while len(session.maps) > MAX_KEPT:
            session.maps.pop(next(iter(session.maps)))
    return session.maps[(spec, kind)], f"{kind} map for {spec}, fitted on {len(fit)} training digits"


def _from_file(session: Session, path: str):
    """A map file -> (the map, the network whose maps it takes, that network's name, its manipulation or None).
    ValueError (one line) for a map of another network than the demo's second, or of other shapes."""
    fmap, name = load_map(path, session.device), Path(path).name
    ours = session.name.split(":")[0]  # "demo pair", or the checkpoint + backbone
    source, source_name, spec = session.extractor, ours, fmap.about.get("manipulation")
    if "source" in fmap.about:
        if fmap.about["source"] != SECOND or session.pair.data is None:
            raise ValueError(f"{name}: the map needs {fmap.about['source']}'s feature maps (its source network), which "
                             f"this app does not serve (on the demo pair, only {SECOND}'s); apply it with "
                             f"`featinv maps --map-file {name}`")
        source, source_name, spec = second_classifier(session.pair), SECOND, None
    c, h, w = source.feature_shape
    check_map_fits(fmap, c, (h, w), session.extractor.feature_shape[0], source_name, ours, name)
    if fmap.grid != tuple(session.extractor.feature_shape[1:]):
        raise ValueError(f"{name}: the map gives {fmap.grid[0]}x{fmap.grid[1]} maps, but {ours} inverts "
                         f"{'x'.join(map(str, session.extractor.feature_shape[1:]))}")
    # folder pairs: an edit made elsewhere, nothing to apply to the input, so no own map
    return fmap, source, source_name, None if spec == "folder pairs" else spec


def _rows(session: Session, maps: dict[str, torch.Tensor], own: torch.Tensor | None, rec_probs: dict):
    """{row name: (1, C, h, w) map} -> the table: cosine and relative error to the own map, the head's top-1."""
    rows = []
    for name, m in maps.items():
        same = own is not None and m.shape == own.shape
        cos = f"{float(cosine_similarity_spatial(m, own)):.3f}" if same else "–"
        err = f"{float((m - own).norm() / own.norm().clamp_min(1e-12)):.3f}" if same else "–"
        with torch.no_grad():
            head = session.extractor.logits_from_features(m.float()).float().softmax(dim=-1)[0]
        rec = label(session, rec_probs[name]) if name in rec_probs else "–"
        rows.append([name, cos, err, label(session, head), rec])
    return pd.DataFrame(rows, columns=COLUMNS)


def run(session: Session, path: str | None, manipulation: str, value, kind: str, map_path: str | None, *,
        cfg: SampleConfig, progress=no_progress):
    """-> (a gallery: input | manipulated | the manipulated image's own map reconstructed | the input's map through
    the map, reconstructed, captioned with the classifier's top-1; a table of those maps (and the unmapped input
    map): cosine and relative error to the own map, the head's top-1; a one-line note on the map). One sample each,
    the same noise. A map file (``map_path``) brings its own manipulation; a map of the demo's second classifier
    (about["source"] == SECOND) maps its map of the input, and the own map is the decoder's map of the input."""
    image = session.load_image(path)                                              # (1, 3, S, S)
    map_path = str(map_path or "").strip()
    if map_path:
        fmap, source, source_name, spec = _from_file(session, map_path)
        what = f"{fmap.kind} map from {Path(map_path).name} (" + (spec or f"{source_name} → the decoder's") + ")"
    else:
        spec, source, source_name = _spec(manipulation, value), session.extractor, None
        fmap, what = _fitted(session, spec, kind, progress)
    cross = source is not session.extractor
    target = manipulate(image, spec, cfg.seed) if spec else None                 # (1, 3, S, S) or None
    progress(0.5, "mapping and reconstructing")
    with torch.no_grad():
        source_map, source_logits = read_back(source, image)                      # (1, C_in, h_in, w_in)
        mapped = fmap(source_map)                                                 # (1, C, h, w)
    own_image = image if cross else target
    own = None if own_image is None else classify(session, own_image)[0]          # (1, C, h, w) or None
    decoded = {} if own is None else {"the decoder's own map" if cross else "own map": own}
    decoded[f"mapped ({fmap.kind})"] = mapped
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))
    samples = rec.from_features(torch.cat(list(decoded.values())), [KEY] * len(decoded))[:, 0]  # (M, 3, H, W)
    pictures = torch.cat([image] + ([] if target is None else [target]))
    _, probs = classify(session, torch.cat([pictures, samples]))
    captions = [f"input: {label(session, probs[0])}"]
    if cross:
        captions[0] += f"; {source_name}: {label(session, source_logits.softmax(dim=-1)[0])}"
    if target is not None:
        captions.append(f"{spec}: {label(session, probs[1])}")
    rec_probs = dict(zip(decoded, probs[len(pictures):]))
    captions += [f"{name} reconstructed: {label(session, p)}" for name, p in rec_probs.items()]
    images = [(tile(x), caption) for x, caption in zip(torch.cat([pictures, samples]), captions)]
    rows = decoded if cross else {**decoded, "unmapped (the input's own)": source_map}
    note = f"{what}; one sample each, the same noise." + (f" Validation R² at fit: {fmap.fit_info['val_r2']:.3f}."
                                                           if "val_r2" in fmap.fit_info else "")
    return images, _rows(session, rows, own, rec_probs), note


def build(shared: Shared) -> Wiring:
    gr.Markdown("Fit a map on the pair's fit images (the demo's training digits; once per manipulation and type), or "
                "give a map file written by `featinv maps` (`maps/<task>_<map>.safetensors`): it brings its own "
                f"manipulation, or maps the demo's second classifier ({SECOND}) into the decoder's space.")
    with gr.Row():
        manipulation = gr.Dropdown(list(MANIPULATIONS), value=MANIPULATIONS[0], label="manipulation",
                                   elem_id="maps-manipulation")
        value = gr.Number(value=MANIPULATION_DEFAULTS[MANIPULATIONS[0]], label="its value (empty: the default)",
                          elem_id="maps-value")
        kind = gr.Radio(list(KINDS.items()), value="linear", label="map type", elem_id="maps-kind")
    map_path = gr.File(label="or a map file, maps/<task>_<map>.safetensors (none: fit the map above)", type="filepath",
                       elem_id="maps-file")
    go = gr.Button("Map", variant="primary", elem_id="maps-run")
    note = gr.Markdown(elem_id="maps-note")
    images = gallery("input | manipulated | its own map, reconstructed | the input's map mapped, reconstructed", 4,
                     "maps-gallery")
    table = gr.Dataframe(headers=COLUMNS, label="the maps on this image", interactive=False, wrap=True,
                         elem_id="maps-table")
    manipulation.change(lambda m: MANIPULATION_DEFAULTS.get(m), manipulation, value, queue=False)
    return Wiring([go.click], [shared.upload, manipulation, value, kind, map_path], [images, table, note])


PANEL = Panel(run, build)
