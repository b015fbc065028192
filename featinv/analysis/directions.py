"""Direction and code-edit specs, as users write them (``featinv steer --direction`` / ``--edit``, the app).

Directions: ``class:<i>``, ``channel:<i>``, ``mean-diff:<a>:<b>``, ``probe:<a>:<b>``, ``concept:<basis>:<i>`` -> a
unit vector in the feature map's channel space (:class:`Direction`, see :mod:`featinv.analysis.steering`). Code edits
of a concept basis: ``set:<basis>:<concepts>``, ``swap:<basis>:<a>:<b>`` -> which concepts go to 0 and which to a
level, and the codes whose quantiles are the levels (:class:`CodeEdit`); :func:`edit_maps` applies one at each level
(:mod:`featinv.analysis.concept_edits`: ``set_code``, ``swap``).

Each kind is one function here, named with its syntax and a one-line help in ``featinv.registry`` (DIRECTIONS,
EDITS); the syntax is read by :func:`featinv.analysis.specs.split_spec` (torch-free, as the command's parse reads
it), which hands the function the fields' values."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from featinv.analysis.common import digit_classes, features_of, image_set
from featinv.analysis.concept_edits import code_levels, concept_direction, swap, top_concepts
from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.specs import DIGIT_SET, Level, split_spec
from featinv.analysis.steering import (
    Clamp,
    channel_direction,
    clamp_changed,
    class_direction,
    mean_difference_direction,
    probe_direction,
)
from featinv.config import EDIT_DEFAULTS
from featinv.registry import DIRECTIONS, EDITS


def _demo(pair) -> bool:
    """Whether ``pair`` is the demo's (digit classes name image sets); None (no pair yet) is not."""
    return getattr(pair, "data", None) is not None


# ----- directions ----------------------------------------------------------------------------------

@dataclass
class Direction:
    """A parsed direction spec: the unit vector (C,), the class it points to (or None), a description,
    and the feature maps of the image sets it was made from (references for a clamp)."""

    vector: Tensor
    target: int | None
    description: str
    reference_feats: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def parse_direction(spec: str, pair) -> Direction:
    """A direction spec (see ``featinv steer --help``) on ``pair`` (a featinv.pair.Pair) -> :class:`Direction`;
    ValueError naming the spec when it does not parse."""
    kind, fields = split_spec(spec, DIRECTIONS, "direction", _demo(pair))
    return DIRECTIONS[kind].load()(spec, fields, pair)


def class_spec(spec: str, fields: list, pair) -> Direction:
    """``class:<i>``: the classifier head's weight vector of class i, pointing to class i."""
    (index,) = fields
    return Direction(class_direction(pair.extractor, index), index, f"direction class:{index} (head weight)")


def channel_spec(spec: str, fields: list, pair) -> Direction:
    """``channel:<i>``: the unit vector of channel i."""
    (index,) = fields
    return Direction(channel_direction(pair.extractor.feature_shape[0], index), None, f"direction channel:{index}")


def _image_sets(spec: str, fields: list, pair, fn) -> Direction:
    """``<kind>:<concept>:<other>``: fn(concept features, other features) -> the direction; on the demo pair
    ``digit<d>`` as the concept points to class d."""
    kind = spec.partition(":")[0]
    concept, other = fields
    x_c, desc_c = image_set(concept, pair)
    x_o, desc_o = image_set(other, pair, exclude=concept)
    f_c, f_o = features_of(pair.extractor, x_c), features_of(pair.extractor, x_o)
    target = None
    if pair.data is not None and concept.startswith("digit") and concept[5:].isdigit():
        target = int(concept[5:])
    return Direction(fn(f_c, f_o), target, f"direction {kind}: {desc_c} vs. {desc_o}", [f_c, f_o])


def mean_diff_spec(spec: str, fields: list, pair) -> Direction:
    """``mean-diff:<concept>:<other>``: the mean feature of the concept images minus that of the others."""
    return _image_sets(spec, fields, pair, mean_difference_direction)


def probe_spec(spec: str, fields: list, pair) -> Direction:
    """``probe:<concept>:<other>``: a logistic-regression probe's weight (a concept activation vector)."""
    return _image_sets(spec, fields, pair, probe_direction)


def check_basis(basis: ConceptBasis, path: str, pair) -> None:
    """ValueError unless ``basis`` (read from ``path``) was fitted on maps with ``pair``'s channel count."""
    c = pair.extractor.feature_shape[0]
    if basis.channels != c:
        raise ValueError(f"concept basis {path!r} was fitted on {basis.channels} channels, the feature map has {c}")


def concept_spec(spec: str, fields: list, pair) -> Direction:
    """``concept:<basis>:<i>``: atom i of a concept basis file written by ``featinv concepts``."""
    path, index = fields
    basis = ConceptBasis.load(path)  # read (and checked finite) before the pair is used
    check_basis(basis, path, pair)
    return Direction(concept_direction(basis, index), None, f"direction concept:{index} ({basis.method}, {path})")


# ----- code edits ----------------------------------------------------------------------------------

@dataclass
class CodeEdit:
    """A parsed edit spec: the concepts whose code goes to 0 (``zeroed``: swap's a) and those set to a level
    (``raised``), the codes (N, k, h, w) whose non-zero quantiles are the levels, the class edited towards (or
    None), a description, and the maps the edit was read from (references for a clamp)."""

    basis: ConceptBasis
    zeroed: list[int]
    raised: list[int]
    level_codes: Tensor
    target: int | None
    description: str
    reference_feats: list[Tensor] = field(default_factory=list)


def edit_basis(spec: str, demo: bool) -> ConceptBasis:
    """The basis an edit spec names, read and checked against the spec's concept indices (no model needed);
    demo: digit classes are image sets. ValueError naming the spec otherwise."""
    _, fields = split_spec(spec, EDITS, "edit", demo)
    basis = ConceptBasis.load(fields[0])
    bad = [i for i in fields[1] if i >= basis.k] if isinstance(fields[1], tuple) else []
    if bad:
        raise ValueError(f"{spec!r}: concept index {bad[0]} out of range: the basis has {basis.k} concepts "
                         f"(0..{basis.k - 1})")
    return basis


class _Sets:
    """The codes an edit reads: the reference maps' (the demo's training digits, else the edited maps) and an image
    set's against the rest: on the demo, digit classes vs. every other training digit; a folder vs. the edited maps."""

    def __init__(self, basis: ConceptBasis, pair, feats: Tensor):
        self.basis, self.pair = basis, pair
        self.reference = feats
        if _demo(pair):
            self.reference = features_of(pair.extractor, pair.data["x_train"].expand(-1, 3, -1, -1))
        self.maps = [self.reference]
        self.codes_ref, self.codes_in = basis.encode(self.reference), basis.encode(feats)
        self.what = "the training digits" if _demo(pair) else "the inputs"

    def top(self, name: str, n: int) -> tuple[list[int], Tensor, int | None, str]:
        """Image set ``name`` -> (its n most distinctive concepts, its codes, its class or None, a description)."""
        if _demo(self.pair) and DIGIT_SET.fullmatch(name) and not Path(name).exists():
            classes = digit_classes(name)
            codes, labels = self.codes_ref, torch.isin(self.pair.data["y_train"], torch.tensor(classes))
            cls, desc = (classes[0] if len(classes) == 1 else None), "digits " + "+".join(map(str, classes))
        else:
            x, desc = image_set(name, self.pair)
            maps = features_of(self.pair.extractor, x)
            self.maps.append(maps)
            codes = torch.cat([self.basis.encode(maps), self.codes_in])
            labels = torch.arange(len(codes)) < len(maps)
            cls = None
        labels = labels.long().to(codes.device)
        return top_concepts(self.basis, codes, labels, 1, n), codes[labels == 1], cls, desc


@torch.no_grad()
def parse_edit(spec: str, pair, feats: Tensor, n: int | None = None, basis: ConceptBasis | None = None) -> CodeEdit:
    """An edit spec (see ``featinv steer --help``) for the maps ``feats`` (B, C, h, w) on ``pair`` -> :class:`CodeEdit`.

    n: how many concepts an image set moves (default: EDIT_DEFAULTS of the kind, at most the basis's k); basis: the
    spec's basis, if already read (:func:`edit_basis`). ValueError naming the spec when it does not parse."""
    kind, fields = split_spec(spec, EDITS, "edit", _demo(pair))
    basis = edit_basis(spec, _demo(pair)) if basis is None else basis
    check_basis(basis, fields[0], pair)
    sets = _Sets(basis, pair, feats)
    edit = EDITS[kind].load()(fields, basis, sets, min(EDIT_DEFAULTS[kind][1], basis.k) if n is None else n)
    edit.reference_feats = sets.maps
    return edit


def set_edit(fields: list, basis: ConceptBasis, sets: _Sets, n: int) -> CodeEdit:
    """``set:<basis>:<concepts>``: concept indices to levels of their codes on the reference maps, or an image set's
    top n concepts to levels of the set's codes."""
    path, concepts = fields
    if isinstance(concepts, tuple):
        raised = list(dict.fromkeys(concepts))
        return CodeEdit(basis, [], raised, sets.codes_ref, None,
                        f"set:{path}: concepts {raised}, levels from {sets.what}")
    raised, codes, cls, desc = sets.top(concepts, n)
    return CodeEdit(basis, [], raised, codes, cls, f"set:{path}: the top {n} concepts of {desc} {raised}, its levels")


def swap_edit(fields: list, basis: ConceptBasis, sets: _Sets, n: int) -> CodeEdit:
    """``swap:<basis>:<a>:<b>``: a's top n concepts to 0, b's top n to levels of b's codes (a concept in both goes
    to its level, as :func:`swap` has it)."""
    path, a, b = fields
    top_a, _, _, desc_a = sets.top(a, n)
    raised, codes, cls, desc_b = sets.top(b, n)
    zeroed = [c for c in top_a if c not in raised]
    return CodeEdit(basis, zeroed, raised, codes, cls,
                    f"swap:{path}: {desc_a} -> {desc_b}, top {n} concepts {zeroed} to 0, {raised} to b's levels")


@torch.no_grad()
def edit_maps(edit: CodeEdit, feats: Tensor, levels: Sequence[Level], mask: Tensor | None = None,
              clamp: Clamp | None = None) -> Tensor:
    """feats (B, C, h, w) edited at each level -> (B, 1 + L, C, h, w), the unedited maps first.

    A level is a quantile of each concept's non-zero codes in ``edit.level_codes`` (:func:`code_levels`) or a code
    in feature units. The zeroed concepts go to 0 and the raised ones to their level (:func:`swap`; with nothing
    zeroed that is :func:`set_code`), each location keeping its residual; mask: (h, w) weights in [0, 1] that scale
    the change; clamp: (lo, hi) for the changed entries (:func:`clamp_changed`)."""
    codes = edit.basis.encode(feats)
    out = [feats]
    for level in levels:
        if level.quantile:
            values = code_levels(edit.basis, edit.level_codes, level.value)
        else:
            values = torch.full((edit.basis.k,), float(level.value))
        edited = swap(feats, edit.basis, edit.zeroed, edit.raised, values, mask, codes)
        out.append(edited if clamp is None else clamp_changed(edited, feats, clamp))
    return torch.stack(out, dim=1)
