"""Direction specs, as users write them (``featinv steer --direction``, the app): ``class:<i>``,
``channel:<i>``, ``mean-diff:<a>:<b>``, ``probe:<a>:<b>``, ``concept:<basis>:<i>`` -> a unit vector in the
feature map's channel space (see :mod:`featinv.analysis.steering`).

Each kind is one function here, ``f(spec, args, pair) -> Direction`` (args: the spec after ``<kind>:``), named
with its syntax and a one-line help in ``featinv.registry.DIRECTIONS``; the list of kinds in errors and the
help text (``featinv.commands.steer.EPILOG``, torch-free) come from that table."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from featinv.analysis.common import features_of, image_set
from featinv.analysis.concept_edits import concept_direction
from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.steering import channel_direction, class_direction, mean_difference_direction, probe_direction
from featinv.registry import DIRECTIONS


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
    kind, _, args = spec.partition(":")
    if kind not in DIRECTIONS:
        raise ValueError(f"direction {spec!r}: unknown kind {kind!r} ({', '.join(DIRECTIONS)})")
    return DIRECTIONS[kind].load()(spec, args, pair)


def _index(spec: str, args: str) -> int:
    try:
        return int(args)
    except ValueError:
        kind = spec.partition(":")[0]
        raise ValueError(f"direction {spec!r}: {kind}:<index> needs an integer index") from None


def class_spec(spec: str, args: str, pair) -> Direction:
    """``class:<i>``: the classifier head's weight vector of class i, pointing to class i."""
    index = _index(spec, args)
    return Direction(class_direction(pair.extractor, index), index, f"direction class:{index} (head weight)")


def channel_spec(spec: str, args: str, pair) -> Direction:
    """``channel:<i>``: the unit vector of channel i."""
    index = _index(spec, args)
    return Direction(channel_direction(pair.extractor.feature_shape[0], index), None, f"direction channel:{index}")


def _image_sets(spec: str, args: str, pair, fn) -> Direction:
    """``<kind>:<concept>:<other>``: fn(concept features, other features) -> the direction; on the demo pair
    ``digit<d>`` as the concept points to class d."""
    kind = spec.partition(":")[0]
    concept, sep, other = args.rpartition(":")
    if not sep or not concept or not other:
        raise ValueError(f"direction {spec!r}: use {kind}:<concept folder>:<other folder>")
    x_c, desc_c = image_set(concept, pair)
    x_o, desc_o = image_set(other, pair, exclude=concept)
    f_c, f_o = features_of(pair.extractor, x_c), features_of(pair.extractor, x_o)
    target = None
    if pair.data is not None and concept.startswith("digit") and concept[5:].isdigit():
        target = int(concept[5:])
    return Direction(fn(f_c, f_o), target, f"direction {kind}: {desc_c} vs. {desc_o}", [f_c, f_o])


def mean_diff_spec(spec: str, args: str, pair) -> Direction:
    """``mean-diff:<concept>:<other>``: the mean feature of the concept images minus that of the others."""
    return _image_sets(spec, args, pair, mean_difference_direction)


def probe_spec(spec: str, args: str, pair) -> Direction:
    """``probe:<concept>:<other>``: a logistic-regression probe's weight (a concept activation vector)."""
    return _image_sets(spec, args, pair, probe_direction)


def concept_spec(spec: str, args: str, pair) -> Direction:
    """``concept:<basis>:<i>``: atom i of a concept basis file written by ``featinv concepts``."""
    path, sep, index = args.rpartition(":")
    if not sep or not path or not index.isdigit():
        raise ValueError(f"direction {spec!r}: use concept:<basis file>:<concept index>")
    basis = ConceptBasis.load(path)
    c = pair.extractor.feature_shape[0]
    if basis.channels != c:
        raise ValueError(f"concept basis {path!r} was fitted on {basis.channels} channels, the feature map has {c}")
    return Direction(concept_direction(basis, int(index)), None, f"direction concept:{index} ({basis.method}, {path})")
