"""The web page: the shared input image, the sampler settings, and a tab per panel of
:data:`featinv.registry.PANELS` (:mod:`featinv.app.panels`), in the registry's order.

Every panel's ``run`` is called through :func:`featinv.app.widgets.handler`, which turns every failure into
a message in the page (``gr.Error``), never a traceback; the server keeps serving. :class:`Callbacks` gives
the same handlers without a page (tests, benchmarks). Requests are queued and run one at a time (one model,
one worker). Imported only by the ``featinv app`` face: it needs gradio.
"""
from __future__ import annotations

import gradio as gr

from featinv.app.session import MAX_APP_SAMPLES, MAX_GUIDANCE, MAX_STEPS, Session
from featinv.app.show import tile
from featinv.app.widgets import Shared, handler, image_upload, run_on, user_errors
from featinv.config import UNCOND_MODES
from featinv.registry import PANELS, SAMPLERS, names

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


class Callbacks:
    """The page's handlers for one session, without a page: ``preview`` and one per panel, named as the panel
    in lower case (``cb.reconstruct(path, *sampler)``, ``cb.steer(...)``); each takes the panel's inputs, then
    the Advanced section's values (steps, guidance, uncond, seed, K), and returns what its outputs show."""

    def __init__(self, session: Session):
        self.session = session
        for name, entry in PANELS.items():
            setattr(self, name.lower(), handler(session, name.lower(), entry.load().run))

    def preview(self, path):
        """Upload -> the input as the classifier sees it (S x S), or a message for a bad file."""
        if path is None:
            return None
        with user_errors():
            return tile(self.session.load_image(path)[0])


def _advanced(session: Session) -> list:
    d = session.sample_config
    with gr.Accordion("Advanced: sampler settings", open=False):
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="steps", elem_id="steps",
                              info=f"of the model's sampler, {d.sampler}: {SAMPLERS[d.sampler].help}")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=d.guidance_scale, step=0.25, label="guidance scale",
                                 elem_id="guidance")
        with gr.Row():
            uncond = gr.Radio(list(UNCOND_MODES), value=d.uncond, label="unconditional branch "
                              "(prompt: empty prompt, features kept; features: both dropped)", elem_id="uncond")
            seed = gr.Number(value=d.seed, precision=0, minimum=0, label="seed", elem_id="seed")
            k = gr.Slider(1, MAX_APP_SAMPLES, value=max(d.num_samples, 4), step=1, label="K (reconstructions)",
                          elem_id="k")
    return [steps, guidance, uncond, seed, k]


def build(session: Session) -> gr.Blocks:
    """The page: the input image and the Advanced section beside a tab per panel of the registry."""
    cb = Callbacks(session)
    with gr.Blocks(title="featinv explorer", analytics_enabled=False) as page:
        gr.Markdown(f"## featinv explorer\nServing **{session.name}**. Upload an image (or pick an example): "
                    f"the classifier sees it at {session.image_size}x{session.image_size}; FeatInv "
                    f"reconstructs images from the classifier's feature map. The panels: {names(PANELS)}.")
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
                for name, entry in PANELS.items():
                    with gr.Tab(name, id=name.lower()):
                        gr.Markdown(f"*{entry.help[0].upper()}{entry.help[1:]}.*")
                        wiring = entry.load().build(Shared(session, upload))
                        for trigger in wiring.triggers:
                            run_on(trigger, getattr(cb, name.lower()), [*wiring.inputs, *sampler], wiring.outputs)
        run_on(upload.change, cb.preview, [upload], [preview])
    return page
