"""The web page: Gradio layout and thin callbacks over :mod:`featinv.app.panels`.

:class:`Callbacks` binds the panels to one session and turns every failure into a message in the
page (``gr.Error``), never a traceback; the server keeps serving. Requests are queued and run one
at a time (one model, one worker). Imported only by the ``featinv app`` face: it needs gradio.
"""
from __future__ import annotations

import contextlib
import traceback

import gradio as gr

from featinv.app import panels
from featinv.app.session import CLAMPS, MAX_GUIDANCE, MAX_SAMPLES, MAX_STEPS, Session
from featinv.config import UNCOND_MODES

# Gallery captions sit under their picture and wrap (Gradio overlays them on it, cut to one line).
CSS = """
.pixelated img { image-rendering: pixelated; }
.featinv-upload img { width: 100%; height: 100%; object-fit: contain; }
#examples img, #examples-b img { image-rendering: pixelated; }
.featinv-gallery, .featinv-gallery .grid-wrap { height: auto !important; min-height: 0 !important;
                                               max-height: 560px; }
.featinv-gallery .grid-container { padding-top: var(--size-8); }
.featinv-gallery .thumbnail-item { aspect-ratio: auto; display: flex; flex-direction: column; }
.featinv-gallery .thumbnail-item .caption-label { position: static; max-width: 100%; white-space: normal;
                                                  overflow: visible; opacity: 1; }
footer { display: none !important; }
"""


def image_upload(label: str, elem_id: str) -> gr.Image:
    """An image input that shows the uploaded picture but hands the callbacks the file's path unread:
    :meth:`Session.load_image` checks the file (type, size, pixels) before anything decodes it; gr.Image's
    own preprocessing would open it first. (Not a subclass: Gradio writes a .pyi beside any subclass.)"""
    image = gr.Image(label=label, type="filepath", sources=["upload"], elem_id=elem_id, height=180,
                     elem_classes=["pixelated", "featinv-upload"])
    image.preprocess = lambda payload: None if payload is None else str(payload.path)
    return image


@contextlib.contextmanager
def user_errors():
    """ValueError / FileNotFoundError -> gr.Error with their one-line message; anything else -> a short
    gr.Error naming the exception (the traceback goes to the server's log, not the page)."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e), duration=None, print_exception=False) from None
    except Exception as e:  # a bug, not the user's fault: log it, keep serving
        traceback.print_exc()
        raise gr.Error(f"internal error ({type(e).__name__}): {e}", duration=None, print_exception=False) from None


def run_on(trigger, fn, inputs: list, outputs: list) -> None:
    """``trigger(fn, inputs, outputs)``; when fn fails, its outputs are emptied (no earlier result stays
    under the error) and the message stays in the page until closed."""
    empty = None if len(outputs) == 1 else [None] * len(outputs)
    trigger(fn, inputs, outputs).failure(lambda: empty, None, outputs, queue=False)


class Callbacks:
    """The page's event handlers for one session; each returns what its output components show.

    ``sampler`` arguments are the Advanced section's values: steps, guidance, uncond, seed, K."""

    def __init__(self, session: Session):
        self.session = session

    def preview(self, path):
        """Upload -> the input as the classifier sees it (S x S), or a message for a bad file."""
        if path is None:
            return None
        with user_errors():
            return panels.tile(self.session.load_image(path)[0])

    def reconstruct(self, path, *sampler, progress=gr.Progress()):
        with user_errors():
            cfg = self.session.sample_config_from(*sampler)
            out = panels.reconstruct(self.session, path, cfg, progress)
            mean = sum(out.cosine) / len(out.cosine)
            note = (f"Feature cosine of the reconstructions to the original's feature map: "
                    f"{', '.join(f'{c:.3f}' for c in out.cosine)} (mean {mean:.3f}).")
            return out.gallery, out.uncertainty, out.table, note

    def steer(self, path, kind, class_name, channel, strength, clamp, region, coords, *sampler,
              progress=gr.Progress()):
        with user_errors():
            cfg = self.session.sample_config_from(*sampler)
            out = panels.steer(self.session, path, kind, class_name, channel, strength, clamp, region, coords,
                               cfg, progress)
            return out.strip, out.table

    def compose(self, path_a, path_b, t, region, coords, *sampler, progress=gr.Progress()):
        with user_errors():
            cfg = self.session.sample_config_from(*sampler)
            out = panels.compose_maps(self.session, path_a, path_b, t, region, coords, cfg, progress)
            mean = sum(out.cosine) / len(out.cosine)
            return out.gallery, out.table, f"Feature cosine to the composed map: mean {mean:.3f}."

    def perturb(self, path, kind, severity, eps, steps, target, *sampler, progress=gr.Progress()):
        with user_errors():
            cfg = self.session.sample_config_from(*sampler)
            out = panels.perturb_image(self.session, path, kind, severity, eps, steps, target, cfg, progress)
            return out.clean, out.perturbed, out.table

    def concepts(self, path, basis, index, strength, *sampler, progress=gr.Progress()):
        with user_errors():
            cfg = self.session.sample_config_from(*sampler)
            out = panels.concepts(self.session, path, basis, index, strength, cfg, progress)
            return out.heat, out.strip, out.removed, out.table


def _gallery(label: str, columns: int, elem_id: str) -> gr.Gallery:
    """A gallery as tall as its pictures and their captions (CSS), up to two rows of four."""
    return gr.Gallery(label=label, columns=columns, format="png", object_fit="contain",
                      elem_id=elem_id, elem_classes=["pixelated", "featinv-gallery"], interactive=False)


def _table(label: str, elem_id: str, columns: list[str]) -> gr.Dataframe:
    return gr.Dataframe(headers=["rank"] + columns, label=label, interactive=False, elem_id=elem_id,
                        wrap=True)


def _region_inputs(prefix: str, session: Session):
    _, h, w = session.extractor.feature_shape
    s = session.image_size
    with gr.Row():
        region = gr.Radio(list(panels.REGIONS), value="whole map", label="region", elem_id=f"{prefix}-region")
        coords = gr.Textbox(label=f"box: x0, y0, x1, y1 in pixels of the {s}x{s} input; cell: row, col of the "
                                  f"{h}x{w} feature grid", value=f"0, 0, {s // 2}, {s // 2}", elem_id=f"{prefix}-coords")
    return region, coords


def _advanced(session: Session) -> list:
    d = session.sample_config
    with gr.Accordion("Advanced: sampler settings", open=False):
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="DDIM steps", elem_id="steps")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=d.guidance_scale, step=0.25, label="guidance scale",
                                 elem_id="guidance")
        with gr.Row():
            uncond = gr.Radio(list(UNCOND_MODES), value=d.uncond, label="unconditional branch "
                              "(prompt: empty prompt, features kept; features: both dropped)", elem_id="uncond")
            seed = gr.Number(value=d.seed, precision=0, minimum=0, label="seed", elem_id="seed")
            k = gr.Slider(1, MAX_SAMPLES, value=max(d.num_samples, 4), step=1, label="K (reconstructions)",
                          elem_id="k")
    return [steps, guidance, uncond, seed, k]


def _reconstruct_tab(cb: Callbacks, upload, sampler) -> None:
    run = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-run")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = _gallery("reconstructions (K samples)", 4, "reconstruct-gallery")
        with gr.Column(scale=1, min_width=160):
            spread = gr.Image(label="spread (std)", format="png", interactive=False,
                              elem_classes=["pixelated"], height=200, elem_id="reconstruct-uncertainty")
    table = _table("classifier top-5: original and each reconstruction", "reconstruct-table", ["original", "sample 1"])
    note = gr.Markdown(elem_id="reconstruct-cosine")
    run_on(run.click, cb.reconstruct, [upload, *sampler], [gallery, spread, table, note])


def _steer_tab(cb: Callbacks, upload, sampler) -> None:
    session, names = cb.session, cb.session.class_names
    with gr.Row():
        kind = gr.Radio(["class", "channel"], value="class", label="direction", elem_id="steer-kind")
        cls = gr.Dropdown(names, value=names[0], label="class (head weight)", elem_id="steer-class")
        channel = gr.Number(value=0, precision=0, minimum=0, maximum=session.extractor.feature_shape[0] - 1,
                            label="channel", elem_id="steer-channel")
    strength = gr.Slider(-panels.MAX_STRENGTH, panels.MAX_STRENGTH, value=2, step=0.25, elem_id="steer-strength",
                         label="strength (units of the map's mean feature norm); the strip runs 0..strength")
    clamp = gr.Radio(list(CLAMPS), value="per channel", elem_id="steer-clamp",
                     label="clamp edited features to the backbone's range (min/max over reference images); "
                           "without it strong edits leave that range and the reconstructions stop following them")
    region, coords = _region_inputs("steer", session)
    go = gr.Button("Steer", variant="primary", elem_id="steer-run")
    strip = _gallery("reconstructions over strengths 0..strength (caption: the classifier's top-1)", panels.STRIP,
                     "steer-strip")
    table = gr.Dataframe(headers=["strength α", "head on the steered map", "classifier on the reconstruction"],
                         label="top-1 per strength", interactive=False, elem_id="steer-table")
    args = [upload, kind, cls, channel, strength, clamp, region, coords, *sampler]
    run_on(go.click, cb.steer, args, [strip, table])
    run_on(strength.release, cb.steer, args, [strip, table])  # moving the slider redraws the strip


def _compose_tab(cb: Callbacks, upload, sampler) -> None:
    upload_b = image_upload("image B (A is the shared input)", "upload-b")
    if cb.session.examples:
        gr.Examples(cb.session.examples, inputs=upload_b, label="examples for B", examples_per_page=10,
                    elem_id="examples-b")
    t = gr.Slider(0, 1, value=0.5, step=0.05, label="interpolation t: (1 - t) A + t B", elem_id="compose-t")
    region, coords = _region_inputs("compose", cb.session)
    gr.Markdown("The region (if any) is pasted from B's feature map into the interpolated map.")
    go = gr.Button("Compose", variant="primary", elem_id="compose-run")
    gallery = _gallery("A, B and reconstructions of the composed map", 6, "compose-gallery")
    table = _table("top-5: the head on the composed map, the classifier on each reconstruction",
                   "compose-table", ["composed map (head)", "sample 1"])
    note = gr.Markdown(elem_id="compose-cosine")
    run_on(go.click, cb.compose, [upload, upload_b, t, region, coords, *sampler], [gallery, table, note])


def _perturb_tab(cb: Callbacks, upload, sampler) -> None:
    with gr.Row():
        method = gr.Dropdown(list(panels.PERTURBATIONS), value=panels.PERTURBATIONS[0], label="perturbation",
                             elem_id="perturb-kind")
        severity = gr.Slider(1, 3, value=2, step=1, label="corruption severity")
        eps = gr.Slider(1, panels.MAX_EPS_255, value=32, step=1, label="PGD budget eps (/255)")
        steps = gr.Slider(1, panels.MAX_PGD_STEPS, value=10, step=1, label="PGD steps")
        target = gr.Dropdown(["untargeted"] + cb.session.class_names, value="untargeted", label="PGD target")
    go = gr.Button("Perturb", variant="primary", elem_id="perturb-run")
    clean = _gallery("clean input and its reconstructions", 5, "perturb-clean")
    attacked = _gallery("perturbed input and its reconstructions", 5, "perturb-perturbed")
    table = _table("top-5", "perturb-table", ["clean", "clean sample 1", "perturbed", "perturbed sample 1"])
    run_on(go.click, cb.perturb, [upload, method, severity, eps, steps, target, *sampler], [clean, attacked, table])


def _concepts_tab(cb: Callbacks, upload, sampler) -> None:
    gr.Markdown("A concept basis from `featinv concepts` (its `concepts.safetensors`; the atlas shows what each "
                "concept is): where the concept sits in this image, steering along it, and the image without it.")
    with gr.Row():
        basis = gr.File(label="concept basis (concepts.safetensors)", type="filepath", elem_id="concepts-basis")
        index = gr.Number(value=0, precision=0, minimum=0, label="concept", elem_id="concepts-index")
        strength = gr.Slider(-4, 4, value=2, step=0.25, elem_id="concepts-strength",
                             label="steering strength (units of the map's mean feature norm); the strip runs 0..strength")
    go = gr.Button("Show concept", variant="primary", elem_id="concepts-run")
    with gr.Row():
        heat = gr.Image(label="the concept's code over the grid (heat)", format="png", interactive=False,
                        elem_classes=["pixelated"], height=200, elem_id="concepts-heat")
        removed = _gallery("reconstruction, and without the concept", 2, "concepts-removed")
    strip = _gallery("steered along the concept: strengths 0..strength", panels.STRIP, "concepts-strip")
    table = gr.Dataframe(headers=["concept", "code on this image", "head on the map without it"],
                         label="every concept of the basis on this image", interactive=False, elem_id="concepts-table")
    args = [upload, basis, index, strength, *sampler]
    go.click(cb.concepts, args, [heat, strip, removed, table])
    strength.release(cb.concepts, args, [heat, strip, removed, table])


def build(session: Session) -> gr.Blocks:
    """The panels (Reconstruct, Steer, Compose, Perturb, Concepts) over one shared input image."""
    cb = Callbacks(session)
    with gr.Blocks(title="featinv explorer", analytics_enabled=False) as page:
        gr.Markdown(f"## featinv explorer\nServing **{session.name}**. Upload an image (or pick an example): "
                    f"the classifier sees it at {session.image_size}x{session.image_size}; FeatInv "
                    "reconstructs images from the classifier's feature map.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = image_upload("image", "upload")
                preview = gr.Image(label="input as the classifier sees it", interactive=False, format="png",
                                   elem_id="preview", elem_classes=["pixelated"], height=180)
                if session.examples:
                    gr.Examples(session.examples, inputs=upload, label="examples", examples_per_page=10,
                                elem_id="examples")
                sampler = _advanced(session)
            with gr.Column(scale=3), gr.Tabs():
                for name, tab in [("Reconstruct", _reconstruct_tab), ("Steer", _steer_tab),
                                  ("Compose", _compose_tab), ("Perturb", _perturb_tab),
                                  ("Concepts", _concepts_tab)]:
                    with gr.Tab(name, id=name.lower()):
                        tab(cb, upload, sampler)
        run_on(upload.change, cb.preview, [upload], [preview])
    return page
