"""Reading old LDM / Lightning 1.x pickles without executing anything from them.

Checkpoints trained with the LDM code base (miniSD, Stable Diffusion 1.x; Lightning 1.4-era) key
their ``callbacks`` dict by the callback *class* and hold numpy scalars and arrays. Those globals fail
``torch.load(weights_only=True)``, although only the state dict is ever used. :func:`legacy_globals`
lists inert stand-ins for exactly these names, for ``torch.serialization.safe_globals``: torch's
weights-only unpickler then resolves each name to a stand-in that merely records its arguments
(nothing is imported, nothing of the file's is called), and refuses every other global as before.
"""
from __future__ import annotations

from typing import Any


class Inert:
    """Stands in for a class or function named in a pickle; records arguments and state, does nothing."""

    name = "?"

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:  # BUILD opcode: keep the state as data
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.name}>"


def _stand_in(name: str) -> type[Inert]:
    """A distinct stand-in class per name (they may be dict keys, as the callback classes are)."""
    return type(f"Inert[{name}]", (Inert,), {"name": name})


_NUMPY = [f"{pkg}.{attr}" for pkg in ("numpy.core.multiarray", "numpy._core.multiarray")
          for attr in ("scalar", "_reconstruct")] + ["numpy.ndarray", "numpy.dtype"]
_LIGHTNING_CALLBACKS = [f"{pkg}.callbacks.{mod}.{cls}" for pkg in ("pytorch_lightning", "lightning.pytorch")
                        for mod, cls in (("model_checkpoint", "ModelCheckpoint"),
                                         ("early_stopping", "EarlyStopping"),
                                         ("lr_monitor", "LearningRateMonitor"))]
LEGACY_GLOBAL_NAMES = tuple(_NUMPY + _LIGHTNING_CALLBACKS)
_STAND_INS = [(_stand_in(name), name) for name in LEGACY_GLOBAL_NAMES]


def legacy_globals() -> list[tuple[type, str]]:
    """(stand-in, dotted name) pairs for ``torch.serialization.safe_globals``."""
    return list(_STAND_INS)
