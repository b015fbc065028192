"""The Concepts panel's look-ups, without the page: the basis's concept index, the concepts found by class or
frequency, the concepts active at a clicked location, and code levels read from the session's reference maps.

The index is ``basis.stats["index"]``, written by ``featinv concepts``: {"images": fit images, "frequency": (k,)
share of fit locations where each concept is active, "mean_code": (k,), "classes": per concept up to 3 class
indices (largest logit drop first), "importance": (k,)}. A basis without one (an imported SAE) still answers
everything else. Plain functions of the session: the page and the tests call them alike.
"""
from __future__ import annotations

import pandas as pd
import torch

from featinv.analysis import concept_edits
from featinv.analysis.common import features_of
from featinv.analysis.concepts import ConceptBasis
from featinv.app.session import Session, number

NO_INDEX = "this basis has no concept index: run `featinv concepts --basis FILE` once to write it"
INDEX_LISTS = ("frequency", "mean_code", "classes", "importance")  # one entry per concept each
MAX_ACTIVE = 32  # rows of the location query (a wide SAE may have hundreds active at a cell)


def load_basis(basis_path: str | None) -> ConceptBasis:
    if not basis_path:
        raise ValueError("no concept basis: upload a concepts.safetensors written by `featinv concepts`")
    return ConceptBasis.load(basis_path)


def concept_index(basis: ConceptBasis) -> dict | None:
    """The basis's concept index (the module's schema), or None when it has none; ValueError when malformed."""
    index = basis.stats.get("index")
    if index is None:
        return None
    bad = [key for key in INDEX_LISTS if not isinstance(index, dict) or len(index.get(key) or ()) != basis.k]
    if bad:
        raise ValueError(f"the basis's concept index is malformed: {bad[0]!r} must list one entry per concept "
                         f"({basis.k}); run `featinv concepts --basis FILE` again")
    return index


def class_of(session: Session, text) -> int | None:
    """A class box's text (a class name, or an index) -> the class index; None for an empty box."""
    text = str(text or "").strip()
    names = session.class_names
    if not text:
        return None
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    raise ValueError(f"class {text!r} is not one of the classifier's classes (a name, or an index 0..{len(names) - 1})")


def _class_names(session: Session, classes) -> str:
    names = session.class_names
    return ", ".join(names[c] if 0 <= c < len(names) else str(c) for c in classes)


def _index_columns(session: Session, index: dict, concepts: list[int]) -> dict[str, list[str]]:
    return {"active at (share of fit locations)": [f"{100 * index['frequency'][i]:.1f} %" for i in concepts],
            "top classes (largest logit drop first)": [_class_names(session, index["classes"][i]) for i in concepts]}


def find(session: Session, basis_path: str | None, cls, low, high) -> tuple[pd.DataFrame, str]:
    """The concepts whose index lists class ``cls`` (name or index; empty: any) among their top classes and whose
    frequency lies in [low, high] -> (a table in concept order, a one-line note); the note is :data:`NO_INDEX`
    (and the table empty) for a basis without an index."""
    basis = load_basis(basis_path)
    low, high = number(low, "frequency from", 0, 1), number(high, "frequency to", 0, 1)
    if low > high:
        raise ValueError(f"frequency from {low:g} is above frequency to {high:g}")
    c = class_of(session, cls)
    index = concept_index(basis)
    if index is None:
        return pd.DataFrame({"concept": []}), NO_INDEX
    found = [i for i in range(basis.k) if low <= index["frequency"][i] <= high
             and (c is None or c in index["classes"][i])]
    table = pd.DataFrame({"concept": [str(i) for i in found], **_index_columns(session, index, found),
                          "mean code": [f"{index['mean_code'][i]:.3g}" for i in found],
                          "importance": [f"{index['importance'][i]:.3g}" for i in found]})
    which = "" if c is None else f" with class {session.class_names[c]} among their top classes and"
    note = (f"{len(found)} of the {basis.k} concepts{which} active at {100 * low:g}..{100 * high:g} % of the "
            f"fit locations ({index.get('images', '?')} fit images)")
    return table, note


@torch.no_grad()
def at(session: Session, path: str | None, basis_path: str | None, x, y) -> tuple[pd.DataFrame, str]:
    """The concepts active at pixel (x, y) of the S x S input (the grid cell over it) -> (a table: concept, its code
    there, strongest |code| first, with its frequency and top classes when the basis has an index; a note)."""
    image = session.load_image(path)
    basis = load_basis(basis_path)
    size = session.image_size
    x, y = number(x, "x (pixels)", 0, size), number(y, "y (pixels)", 0, size)
    codes = basis.encode(features_of(session.extractor, image))                    # (1, k, h, w)
    h, w = codes.shape[2:]
    row, col = concept_edits.pixel_cell(x, y, size, (h, w))
    active = concept_edits.active_at(codes, row, col)
    shown = [i for i, _ in active[:MAX_ACTIVE]]
    table = {"concept": [str(i) for i in shown], "code here": [f"{v:.3g}" for _, v in active[:MAX_ACTIVE]]}
    index = concept_index(basis)
    if index is not None:
        table.update(_index_columns(session, index, shown))
    more = f" (the strongest {MAX_ACTIVE} listed)" if len(active) > MAX_ACTIVE else ""
    note = (f"pixel ({x:g}, {y:g}) lies in cell ({row}, {col}) of the {h}x{w} feature grid: {len(active)} of the "
            f"{basis.k} concepts are active there{more}, strongest first" + ("" if index else "; " + NO_INDEX))
    return pd.DataFrame(table), note


@torch.no_grad()
def levels(session: Session, basis: ConceptBasis, feats: torch.Tensor, quantile: float) -> torch.Tensor:
    """Each concept's ``quantile`` of its non-zero codes on the session's reference maps (Steer's clamp references,
    :meth:`Session.references`) and the input's map ``feats`` (1, C, h, w) -> (k,) float32."""
    maps = torch.cat([session.references().to(feats.device), feats.float()])
    return concept_edits.code_levels(basis, basis.encode(maps), quantile)
