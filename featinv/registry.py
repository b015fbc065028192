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


def describe(table: dict[str, Entry], indent: str = "  ") -> str:
    """A help block: one line per entry, ``name  help``, names aligned."""
    width = max(map(len, table))
    return "\n".join(f"{indent}{name:<{width}}  {entry.help}" for name, entry in table.items())


def names(table: dict[str, Entry]) -> str:
    """The entries' names as prose: 'a, b and c'."""
    keys = list(table)
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# Samplers: each is f(eps_fn, x_T, alphas_cumprod, timesteps, *, eta, generator, callback) -> x_0
# (featinv.diffusion.samplers). A deterministic one refuses eta > 0 (STOCHASTIC_SAMPLERS take it).
SAMPLERS: dict[str, Entry] = {
    "ddim": Entry("DDIM (Song et al. 2021), the reference's sampler; eta > 0 adds noise",
                  "featinv.diffusion.samplers:ddim_sample"),
    "dpmpp_2m": Entry("DPM-Solver++(2M) (Lu et al. 2022), deterministic; the same accuracy in fewer steps",
                      "featinv.diffusion.samplers:dpmpp_2m_sample"),
}
STOCHASTIC_SAMPLERS = ("ddim",)

# The app's panels, in the order of its tabs: each is a ``build(session, shared)`` in featinv.app.
PANELS: dict[str, Entry] = {
    "Reconstruct": Entry("K reconstructions of an image from its feature map, their spread and read-back",
                         "featinv.app.panels:reconstruct_panel"),
    "Steer": Entry("move the feature map along a class or channel direction and watch the picture change",
                   "featinv.app.panels:steer_panel"),
    "Compose": Entry("interpolate two images' feature maps, or paste a region of one into the other",
                     "featinv.app.panels:compose_panel"),
    "Perturb": Entry("corruptions and a PGD attack, reconstructed beside the clean image",
                     "featinv.app.panels:perturb_panel"),
    "Concepts": Entry("remove, keep or steer by one concept of a basis written by featinv concepts",
                      "featinv.app.panels:concepts_panel"),
}

# Where a pair comes from when a source names no checkpoint: the demo's (trained on first use). The
# generic loader (featinv.pair) finds it here, so that it does not import the demo, which sits above it.
DEMO_PAIR = Entry("the demo's digits classifier and tiny FeatInv model", "featinv.demo.pair:pair_from_source")
