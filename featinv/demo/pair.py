"""The demo's pair: its digits classifier and tiny FeatInv model, trained on first use and cached
(see :mod:`featinv.demo.stages`); :func:`featinv.pair.load_pair` serves it for a source without a checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from featinv.config import DEMO_OUT, PairSource
from featinv.demo.stages import DemoSettings, demo_parts
from featinv.pair import Pair, check_channels
from featinv.runtime import stderr_line


def pair_from_source(source: PairSource, device, log) -> Pair:
    """The demo pair a :class:`~featinv.config.PairSource` without a checkpoint names (its demo_* fields)."""
    parts = demo_parts(source.demo_out, seed=source.demo_seed, quick=source.demo_quick, device=str(device), log=log)
    return demo_pair(parts, device)


def demo_pair(parts, device: str | torch.device = "cpu") -> Pair:
    """The pair the demo's stages left (a :class:`featinv.demo.stages.DemoParts`)."""
    from featinv.checkpoint.load import load_featinv

    model = load_featinv(parts.checkpoint, device=device).eval()
    check_channels(parts.extractor, model, parts.checkpoint.name)
    return Pair(model, parts.extractor.to(device).eval(), parts.sample_config,
                f"demo pair: digits CNN (feature map {tuple(parts.extractor.feature_shape)}) + tiny FeatInv",
                data=parts.data, folder=parts.cache, labels=[str(d) for d in range(10)])


def load_demo_pair(out: str | Path = DEMO_OUT, seed: int = 0, quick: bool = True, device: str = "cpu",
                   log=stderr_line, retrain: bool = False, settings: DemoSettings | None = None) -> Pair:
    """The demo's classifier + FeatInv model, trained on first use and cached under ``<out>/cache/``.

    ``load_pair(PairSource(demo_out=out, ...))`` serves the same pair; this adds ``retrain`` and other
    ``settings`` (benchmarks). ``featinv demo`` adds the evaluation."""
    parts = demo_parts(out, seed, quick, device, log=log, retrain=retrain, settings=settings)
    return demo_pair(parts, device)


SECOND = "digits-b"        # featinv maps --source-backbone: the demo's second classifier
SECOND_WIDTH, SECOND_SEED = 48, 1


def second_classifier(pair: Pair, log=stderr_line):
    """The demo's second digits classifier (another seed and width: 48 x 2 x 2 maps), trained on the demo pair's
    training digits on first use and cached beside its first -> a FeatureExtractor on the pair's device."""
    from safetensors.torch import load_file, save_file

    from featinv.demo.digits import DigitsCNN, make_extractor, train_classifier
    from featinv.demo.stages import settings_for
    from featinv.io import atomic_save

    path = Path(pair.folder) / f"classifier_{SECOND}-w{SECOND_WIDTH}-seed{SECOND_SEED}.safetensors"
    clf = DigitsCNN(SECOND_WIDTH)
    if path.exists():
        clf.load_state_dict(load_file(path))
    else:
        log(f"{SECOND}: training the demo's second classifier (width {SECOND_WIDTH}, seed {SECOND_SEED})")
        with torch.enable_grad():  # callers may hold no_grad (an analysis, the app)
            clf = train_classifier(pair.data, settings_for(True).classifier_epochs, SECOND_SEED, torch.device("cpu"),
                                   width=SECOND_WIDTH)
        atomic_save(lambda tmp: save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp), path)
    size = pair.extractor.image_size
    return make_extractor(clf.eval(), size).to(pair.device).eval()
