"""The page's parts that every panel uses: what a panel is, how its ``run`` is called, errors as messages,
and the Gradio components they share (an image upload, galleries, tables, region inputs).

A panel (an entry of :data:`featinv.registry.PANELS`) is a :class:`Panel`: ``run`` does the work and
``build`` lays out its tab and says which events run it with which inputs and outputs (:class:`Wiring`); the
page (:mod:`featinv.app.ui`) wires every panel the same way (:func:`handler`, :func:`run_on`).
"""
from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from featinv.app.session import Session
from featinv.app.show import REGIONS

SAMPLER_INPUTS = 5  # the Advanced section's values that end every panel's inputs: steps, guidance, uncond, seed, K


@dataclass(frozen=True)
class Shared:
    """What every panel's ``build`` gets: the served session and the input image all panels share."""

    session: Session
    upload: gr.Image


@dataclass(frozen=True)
class Wiring:
    """A panel's events (e.g. ``button.click``), the components its ``run`` reads (before the sampler
    settings, which the page appends) and those it fills, in ``run``'s order."""

    triggers: list
    inputs: list
    outputs: list


@dataclass(frozen=True)
class Panel:
    """One tab of the page. ``run(session, *inputs, cfg, progress)`` -> the outputs' values, a one-line
    ValueError for a user's mistake; ``build(shared)`` -> its Wiring, laying out the tab on the way."""

    run: Callable
    build: Callable[[Shared], Wiring]


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
    except Exception as e:  # noqa: BLE001 -- a bug, not the user's fault: log it, keep serving
        traceback.print_exc()
        raise gr.Error(f"internal error ({type(e).__name__}): {e}", duration=None, print_exception=False) from None


def handler(session: Session, name: str, run: Callable) -> Callable:
    """A panel's ``run`` as the page calls it: ``(*inputs, *sampler settings, progress)`` -> the outputs. The
    Advanced section's values become the SampleConfig (:meth:`Session.sample_config_from`); every failure
    becomes a message (:func:`user_errors`). ``name``: the event's name in Gradio's API."""
    def handle(*values, progress=gr.Progress()):  # noqa: B008 -- how Gradio passes its progress bar
        with user_errors():
            cfg = session.sample_config_from(*values[-SAMPLER_INPUTS:])
            return run(session, *values[:-SAMPLER_INPUTS], cfg=cfg, progress=progress)

    handle.__name__ = name
    return handle


def run_on(trigger, fn, inputs: list, outputs: list) -> None:
    """``trigger(fn, inputs, outputs)``; when fn fails, its outputs are emptied (no earlier result stays
    under the error) and the message stays in the page until closed."""
    empty = None if len(outputs) == 1 else [None] * len(outputs)
    trigger(fn, inputs, outputs).failure(lambda: empty, None, outputs, queue=False)


def gallery(label: str, columns: int, elem_id: str) -> gr.Gallery:
    """A gallery as tall as its pictures and their captions (CSS), up to two rows of four."""
    return gr.Gallery(label=label, columns=columns, format="png", object_fit="contain",
                      elem_id=elem_id, elem_classes=["pixelated", "featinv-gallery"], interactive=False)


def top5_table(label: str, elem_id: str, columns: list[str]) -> gr.Dataframe:
    return gr.Dataframe(headers=["rank"] + columns, label=label, interactive=False, elem_id=elem_id, wrap=True)


def region_inputs(prefix: str, session: Session) -> tuple[gr.Radio, gr.Textbox]:
    """The region a panel edits (:func:`featinv.app.show.region_mask`): whole map, a box or a grid cell."""
    _, h, w = session.extractor.feature_shape
    s = session.image_size
    with gr.Row():
        region = gr.Radio(list(REGIONS), value="whole map", label="region", elem_id=f"{prefix}-region")
        coords = gr.Textbox(label=f"box: x0, y0, x1, y1 in pixels of the {s}x{s} input; cell: row, col of the "
                                  f"{h}x{w} feature grid", value=f"0, 0, {s // 2}, {s // 2}",
                            elem_id=f"{prefix}-coords")
    return region, coords
