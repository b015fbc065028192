"""The syntax of direction and edit specs (``featinv steer --direction`` / ``--edit``, the app), checked without torch.

A spec is ``<kind>:<field>:<field>...``; the kinds and their syntax are the tables of :mod:`featinv.registry`
(DIRECTIONS, EDITS), and each placeholder of a syntax (``<i>``, ``<basis>``, ...) names a field type in
:data:`FIELDS`, which checks its text (the number's shape, that a file or folder exists, digit classes only on the
demo pair) and returns its value. The command's parse and the library's parsers
(:mod:`featinv.analysis.directions`) both call :func:`split_spec`, so a spec is read one way: a mistake is answered
before any model loads, and the library sees the same fields. Image manipulation specs (``rotate``, ``rotate:45``;
featinv.registry.MANIPULATIONS) are read by :func:`parse_manipulation`, for the command and
:mod:`featinv.analysis.manipulations` alike. This module imports no torch (nor anything that does).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

from featinv.config import MANIPULATION_DEFAULTS
from featinv.registry import MANIPULATIONS, Spec, names

DIGIT_SET = re.compile(r"digits?\d(\+\d)*")       # the demo's training digits of classes: digit3, digits3+5
INDICES = re.compile(r"\d+(\+\d+)*", re.ASCII)    # concept indices: 3, 3+7


class Usage(ValueError):
    """A field's text does not have the field's shape (answered with the kind's syntax)."""


def index(text: str, demo: bool) -> int:
    """``<i>``: an index >= 0."""
    if not re.fullmatch(r"\d+", text, re.ASCII):
        raise Usage(text)
    return int(text)


def basis_file(text: str, demo: bool) -> str:
    """``<basis>``: a concept basis file (``featinv concepts`` writes concepts.safetensors); it must exist."""
    if Path(text).is_dir():
        raise ValueError(f"concept basis {text!r} is a folder; a concepts.safetensors file is expected")
    if not Path(text).is_file():
        raise ValueError(f"concept basis {text!r} not found")
    return text


def _image_set(text: str, demo: bool, rest: bool) -> str:
    if Path(text).is_dir() or (demo and (DIGIT_SET.fullmatch(text) or (rest and text == "rest"))):
        return text
    digits = "digit3, digits3+5" + (", rest" if rest else "")
    raise ValueError(f"{text!r} is not an image folder" + (f" nor digit classes ({digits})" if demo else ""))


def direction_set(text: str, demo: bool) -> str:
    """``<concept>``, ``<other>``: an image folder; on the demo also ``digit3``, ``digits3+5`` or ``rest`` (every
    digit not in the other set)."""
    return _image_set(text, demo, rest=True)


def edit_set(text: str, demo: bool) -> str:
    """``<a>``, ``<b>``: an image folder; on the demo also ``digit3``, ``digits3+5``."""
    return _image_set(text, demo, rest=False)


def concepts(text: str, demo: bool) -> tuple[int, ...] | str:
    """``<concepts>``: concept indices (``3``, ``3+7``) -> a tuple, else an image set (:func:`edit_set`)."""
    if INDICES.fullmatch(text):
        return tuple(int(i) for i in text.split("+"))
    return edit_set(text, demo)


FIELDS: dict[str, Callable[[str, bool], object]] = {
    "<i>": index, "<basis>": basis_file, "<concept>": direction_set, "<other>": direction_set,
    "<a>": edit_set, "<b>": edit_set, "<concepts>": concepts,
}


def split_spec(spec: str, table: dict[str, Spec], what: str, demo: bool) -> tuple[str, list]:
    """``<kind>:<fields>`` -> (kind, the fields' values) after the kind's syntax in ``table``.

    The first field takes whatever the later ones leave, so a path there may hold ':'. demo: digit classes are
    image sets (the demo pair). ValueError, one line starting with ``what`` (a flag, or 'direction'), otherwise."""
    kind, _, args = spec.partition(":")
    if kind not in table:
        raise ValueError(f"{what}: {spec!r}: unknown kind {kind!r} (choose from {', '.join(table)})")
    fields = table[kind].syntax.split(":")
    parts = args.rsplit(":", len(fields) - 1)
    use = f"{what}: {spec!r}: use {kind}:{table[kind].syntax}"
    if len(parts) != len(fields) or not all(parts):
        raise ValueError(use)
    try:
        return kind, [FIELDS[field](part, demo) for field, part in zip(fields, parts)]
    except Usage:
        raise ValueError(use) from None
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


class Level(NamedTuple):
    """One level of a code edit: a quantile of the concept's non-zero codes (``q0.9``) or a code in feature units."""

    value: float
    quantile: bool

    @property
    def label(self) -> str:
        return f"q{self.value:g}" if self.quantile else f"{self.value:g}"


def parse_levels(text: str, flag: str = "--levels") -> list[Level]:
    """``q0.99,2.5`` -> [Level(0.99, True), Level(2.5, False)], duplicates dropped; ValueError naming ``flag``."""
    levels = []
    for item in (t.strip() for t in text.split(",")):
        quantile = item.startswith(("q", "Q"))
        try:
            value = float(item[1:] if quantile else item)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is neither q<quantile> nor a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{flag}: {item!r} holds {value}; every level must be finite")
        if quantile and not 0 <= value <= 1:
            raise ValueError(f"{flag}: {item!r}: a quantile must lie in [0, 1]")
        levels.append(Level(value, quantile))
    return list(dict.fromkeys(levels))


class Range(NamedTuple):
    """The values a manipulation takes: [low, high], or (low, high] when ``open_low``."""

    low: float
    high: float
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.low == self.high:
            return f"{self.low:g}"
        if math.isinf(self.high):
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


# Beyond these a manipulation means nothing more (a shift past the side, a crop of nothing), so such a value is a
# mistake; featinv.registry.MANIPULATIONS' help says what each value means.
MANIPULATION_RANGES = {
    "hflip": Range(1, 1), "rotate": Range(-360, 360), "translate": Range(-1, 1), "crop": Range(0, 1, open_low=True),
    "blur": Range(0, math.inf), "grayscale": Range(0, 1), "jitter": Range(0, 1), "invert": Range(0, 1),
    "occlude": Range(0, 1, open_low=True),
}


def parse_manipulation(text: str) -> tuple[str, float]:
    """``rotate`` or ``rotate:45`` -> (name, value), the value MANIPULATION_DEFAULTS' when none is given;
    ValueError, one line naming the spec, for an unknown name or a value that is not a number in its range."""
    name, colon, value_text = text.strip().partition(":")
    if name not in MANIPULATIONS:
        raise ValueError(f"manipulation {text!r}: unknown name {name!r} (choose from {names(MANIPULATIONS)})")
    if not colon:
        return name, float(MANIPULATION_DEFAULTS[name])
    try:
        value = float(value_text)
    except ValueError:
        raise ValueError(f"manipulation {text!r}: {value_text!r} is not a number (use {name} or {name}:<value>)"
                         ) from None
    if not math.isfinite(value):
        raise ValueError(f"manipulation {text!r}: the value must be finite, got {value}")
    if value not in MANIPULATION_RANGES[name]:
        raise ValueError(f"manipulation {text!r}: {name}'s value must be {MANIPULATION_RANGES[name]}, got {value:g}")
    return name, value
