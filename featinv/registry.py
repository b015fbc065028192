"""The lists that grow, as tables: name -> one-line help and the import path of the implementation.

This module imports no torch (nor anything that does), so that ``--help`` texts, argument choices and
checks read these tables without loading a network; an implementation is imported when it is used
(:meth:`Entry.load`). Adding a sampler, an app panel, a corruption or a direction kind is one module (or
function) plus one entry here; help texts and docs are generated from the tables.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered implementation: ``help`` (one line) and ``target`` (``package.module:attribute``)."""

    help: str
    target: str

    def load(self) -> Any:
        """The implementation itself (its module is imported now, not before)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Spec(Entry):
    """An Entry that users name with arguments: ``<name>:<syntax>``, e.g. ``class:<i>``."""

    syntax: str = ""


def describe(table: dict[str, Entry], indent: str = "  ") -> str:
    """A help block: one line per entry, ``name  help``, names aligned."""
    width = max(map(len, table))
    return "\n".join(f"{indent}{name:<{width}}  {entry.help}" for name, entry in table.items())


def names(table: dict[str, Entry]) -> str:
    """The entries' names as prose: 'a, b and c'."""
    keys = list(table)
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# Samplers: each is f(eps_fn, x_T, alphas_cumprod, timesteps, *, eta=0.0, generator=None, callback=None,
# **options) -> the final latent (featinv.diffusion.samplers.sample calls it by name). A deterministic one
# refuses eta != 0 itself; STOCHASTIC_SAMPLERS are those that take it (featinv.config.check_eta reads them).
SAMPLERS: dict[str, Entry] = {
    "ddim": Entry("DDIM (Song et al. 2021), the reference's sampler; eta > 0 adds noise",
                  "featinv.diffusion.samplers:ddim_sample"),
    "dpmpp_2m": Entry("DPM-Solver++(2M) (Lu et al. 2022), deterministic; the same accuracy in fewer steps",
                      "featinv.diffusion.samplers:dpmpp_2m_sample"),
}
STOCHASTIC_SAMPLERS = ("ddim",)

# The app's panels, in the order of its tabs (`featinv app`): each is the PANEL of a module of featinv.app.panels,
# a featinv.app.widgets.Panel: ``run`` (the callback) and ``build`` (the tab's layout). The help is the tab's
# first line, `featinv app --help`'s panel list; the names are the tabs' titles.
PANELS: dict[str, Entry] = {
    "Reconstruct": Entry("K reconstructions of the input from its feature map, their spread and the classifier's "
                         "top-5 on each", "featinv.app.panels.reconstruct:PANEL"),
    "Steer": Entry("move the feature map along a class or channel direction (everywhere, a box or a cell) over a "
                   "strip of strengths", "featinv.app.panels.steer:PANEL"),
    "Compose": Entry("interpolate two images' feature maps and paste a region of B's into the result",
                     "featinv.app.panels.compose:PANEL"),
    "Perturb": Entry("a corruption or a PGD attack on the input, reconstructed beside the clean image",
                     "featinv.app.panels.perturb:PANEL"),
    "Concepts": Entry("a basis from featinv concepts: find concepts by class or frequency, those active at a clicked "
                      "place; one concept's heat map, steering along it, its code set or swapped, the image without "
                      "it", "featinv.app.panels.concepts:PANEL"),
    "Maps": Entry("a map inside feature space (featinv maps): the input's map carried to the map of the image "
                  "manipulated (fitted here, or a saved map file), reconstructed beside that image's own map",
                  "featinv.app.panels.maps:PANEL"),
}

# Where a pair comes from when a source names no checkpoint: the demo's (trained on first use). The
# generic loader (featinv.pair) finds it here, so that it does not import the demo, which sits above it.
DEMO_PAIR = Entry("the demo's digits classifier and tiny FeatInv model", "featinv.demo.pair:pair_from_source")

# Common corruptions (featinv perturb, the app's Perturb panel): each is f(images (B, 3, H, W) float32 in [0, 1],
# value, generator) -> (B, 3, H, W) in featinv.analysis.perturb, where ``corrupt`` checks the arguments, looks up
# the value of a severity (SEVERITIES) and clamps the result to [0, 1].
CORRUPTIONS: dict[str, Entry] = {
    "gaussian_noise": Entry("additive Gaussian noise; the value is its std", "featinv.analysis.perturb:gaussian_noise"),
    "blur": Entry("Gaussian blur; the value is its std in pixels per 64 px of image side",
                  "featinv.analysis.perturb:blur"),
    "jpeg": Entry("JPEG compression and decompression; the value is the quality", "featinv.analysis.perturb:jpeg"),
    "contrast": Entry("contrast scaled around each image's mean; the value is the factor",
                      "featinv.analysis.perturb:contrast"),
}

# Image manipulations (featinv maps: the feature map of an image -> that of the image manipulated): each is
# f(images (B, 3, H, W) float32 in [0, 1], value, generator) -> (B, 3, H, W) in featinv.analysis.manipulations, where
# ``manipulate`` clamps the result to [0, 1]. A spec is ``<name>[:<value>]``, read by featinv.analysis.specs.
# parse_manipulation (torch-free), which fills in a missing value from featinv.config.MANIPULATION_DEFAULTS and checks
# it against specs.MANIPULATION_RANGES. Random parameters are drawn from the generator, so a seed fixes the result.
MANIPULATIONS: dict[str, Spec] = {
    "hflip": Spec("mirror left-right; takes no value but 1", "featinv.analysis.manipulations:hflip",
                  syntax="[<value>]"),
    "rotate": Spec("rotation about the centre; the value is the angle in degrees, counter-clockwise (corners grey)",
                   "featinv.analysis.manipulations:rotate", syntax="[<value>]"),
    "translate": Spec("shift right and down; the value is the fraction of the side, in [-1, 1] (negative: left and "
                      "up; the uncovered part grey)", "featinv.analysis.manipulations:translate", syntax="[<value>]"),
    "crop": Spec("zoom into the centre; the value is the fraction of the side kept, in (0, 1], resized back",
                 "featinv.analysis.manipulations:crop", syntax="[<value>]"),
    "blur": Spec("Gaussian blur; the value is its std in pixels per 64 px of image side (at least 1x)",
                 "featinv.analysis.manipulations:blur", syntax="[<value>]"),
    "grayscale": Spec("towards grey levels; the value is the strength in [0, 1] (1: fully grey)",
                      "featinv.analysis.manipulations:grayscale", syntax="[<value>]"),
    "jitter": Spec("colour jitter drawn per image; the value v in [0, 1] bounds the brightness, contrast and "
                   "saturation factors to [1-v, 1+v] and the hue shift to [-v/4, v/4] turn",
                   "featinv.analysis.manipulations:jitter", syntax="[<value>]"),
    "invert": Spec("colours inverted (1 - x); the value is the strength in [0, 1] (1: fully inverted)",
                   "featinv.analysis.manipulations:invert", syntax="[<value>]"),
    "occlude": Spec("a grey square at a place drawn per image; the value is its side as a fraction of the "
                    "image's, in (0, 1]", "featinv.analysis.manipulations:occlude", syntax="[<value>]"),
}


# Direction specs (featinv steer --direction): each kind is f(spec, fields, pair) -> Direction in
# featinv.analysis.directions. The syntax is checked by featinv.analysis.specs.split_spec (torch-free: each
# placeholder is a field type of its FIELDS), which hands the kind its fields' values; featinv steer's help lists
# this table.
DIRECTIONS: dict[str, Spec] = {
    "class": Spec("the classifier head's weight vector of class i", "featinv.analysis.directions:class_spec",
                  syntax="<i>"),
    "channel": Spec("channel i alone", "featinv.analysis.directions:channel_spec", syntax="<i>"),
    "mean-diff": Spec("mean feature of the concept images minus that of the others",
                      "featinv.analysis.directions:mean_diff_spec", syntax="<concept>:<other>"),
    "probe": Spec("a logistic-regression probe's weight (concept activation vector)",
                  "featinv.analysis.directions:probe_spec", syntax="<concept>:<other>"),
    "concept": Spec("atom i of a concept basis written by featinv concepts (concepts.safetensors)",
                    "featinv.analysis.directions:concept_spec", syntax="<basis>:<i>"),
}

# Code edits of a concept basis (featinv steer --edit): each kind is f(fields, basis, sets, n) -> CodeEdit in
# featinv.analysis.directions, its syntax checked as the directions' is; featinv steer's help lists this table.
EDITS: dict[str, Spec] = {
    "set": Spec("codes set to levels of their own (<concepts>: indices 3 or 3+7, or an image set's top concepts)",
                "featinv.analysis.directions:set_edit", syntax="<basis>:<concepts>"),
    "swap": Spec("image set a -> b: a's top concepts set to 0, b's to b's levels",
                 "featinv.analysis.directions:swap_edit", syntax="<basis>:<a>:<b>"),
}

# Concept methods (featinv concepts --method): each is a class in featinv.analysis.concept_methods with fit (streamed
# epochs of vector batches) and encode, and its bounds on k; featinv.analysis.concepts.fit_concepts looks it up by
# name, the basis file records the name, and METHODS there is this table's keys.
CONCEPT_METHODS: dict[str, Entry] = {
    "nmf": Entry("non-negative codes and atoms, for maps after a ReLU (MiniBatchNMF); k <= channels",
                 "featinv.analysis.concept_methods:NMF"),
    "dict": Entry("sparse dictionary learning: non-negative codes, signed atoms, for signed maps such as ConvNeXt's "
                  "or a ViT's (MiniBatchDictionaryLearning)", "featinv.analysis.concept_methods:Dictionary"),
    "pca": Entry("signed codes along orthonormal components around the mean (IncrementalPCA); k <= channels",
                 "featinv.analysis.concept_methods:PCA"),
    "kmeans": Entry("one-hot codes: each location is its nearest cluster centre (MiniBatchKMeans)",
                    "featinv.analysis.concept_methods:KMeans"),
    "topk": Entry("TopK sparse autoencoder (Gao et al. 2024): --top-k active latents per location, any k (thousands "
                  "on a GPU), dead latents revived by the AuxK loss", "featinv.analysis.concept_methods:TopK"),
    "batchtopk": Entry("BatchTopK sparse autoencoder (Bussmann et al. 2024): --top-k active latents per location on "
                       "average, a learned threshold at inference", "featinv.analysis.concept_methods:BatchTopK"),
    "jumprelu": Entry("JumpReLU sparse autoencoder (Rajamanoharan et al. 2024): a threshold per latent; imported "
                      "(--import-sae FILE --sae-type jumprelu), not fitted", "featinv.analysis.concept_methods:JumpReLU"),
}
IMPORTED_METHODS = ("jumprelu",)   # methods a basis may have but --method cannot fit
SAE_METHODS = ("topk", "batchtopk", "jumprelu")   # what --import-sae --sae-type converts

# Feature-space map types (featinv maps --map): each is a class in featinv.analysis.feature_maps with fit (streamed
# (input, target) map batches, options chosen on validation maps) and apply; the map file records the name.
MAP_TYPES: dict[str, Entry] = {
    "identity": Entry("the unmapped map: the baseline every map is read against", "featinv.analysis.feature_maps:Identity"),
    "linear": Entry("one affine map W·x + b shared by every position (closed-form ridge, λ chosen on validation maps)",
                    "featinv.analysis.feature_maps:Linear"),
    "local": Entry("a 3x3 convolution over the grid (the same ridge over unfolded patches)",
                   "featinv.analysis.feature_maps:Convolution"),
    "global": Entry("a small transformer over the grid's tokens (Adam, early-stopped on validation maps)",
                    "featinv.analysis.feature_maps:Transformer"),
}
