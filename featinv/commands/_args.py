"""Argument types and the model-source flags of the command faces, all checked while the command line is
parsed: before torch, timm or Lightning are imported and before any model loads, so a mistake is answered
at once, in one line naming the flag (``argument --mask-image: ...``).

This module imports no torch (a test checks it): a type that needs to read a file reads only its header.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from featinv.checkpoint.hub import looks_like_hub_id
from featinv.config import BACKBONE_PRESETS, DEMO_OUT, MAX_SAMPLES, PRESETS, RUN_CONFIG, WEIGHTS_FILE, PairSource

Invalid = argparse.ArgumentTypeError


def finite_float(text: str) -> float:
    """A finite number (nan, inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise Invalid(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise Invalid(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise Invalid(f"must be > 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """A count >= 1."""
    value = _int(text)
    if value < 1:
        raise Invalid(f"must be >= 1, got {value}")
    return value


def count(text: str) -> int:
    """A count >= 0 (0 has the meaning the flag's help gives it: all, auto, none)."""
    value = _int(text)
    if value < 0:
        raise Invalid(f"must be >= 0, got {value}")
    return value


def sample_count(text: str) -> int:
    """--samples: 1 <= K <= MAX_SAMPLES."""
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise Invalid(f"{value} is above the limit of {MAX_SAMPLES} samples per input")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = _int(text)
    if not 0 < value < 65536:
        raise Invalid(f"{value} is not a TCP port (1-65535)")
    return value


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise Invalid(f"{text!r} not found")
    return path


def existing_file(text: str) -> str:
    """A path to a file that exists (a folder is refused by name)."""
    if _existing(text).is_dir():
        raise Invalid(f"{text!r} is a folder; a file is expected")
    return text


def existing_dir(text: str) -> str:
    """A path to a folder that exists."""
    if not _existing(text).is_dir():
        raise Invalid(f"{text!r} is a file; a folder is expected")
    return text


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    _existing(text)
    return text


def image_file(text: str) -> str:
    """An image file PIL can identify (only its header is read here)."""
    from PIL import Image, UnidentifiedImageError

    existing_file(text)
    try:
        with Image.open(text):
            pass  # open parses the header (and refuses a decompression bomb)
    except UnidentifiedImageError:
        raise Invalid(f"{text!r} is not an image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise Invalid(f"{text!r} cannot be read as an image ({type(e).__name__})") from None
    return text


def image_source(text: str) -> str:
    """An image file or a folder of images (a folder's unreadable files are skipped later, with a warning)."""
    return text if _existing(text).is_dir() else image_file(text)


def checkpoint_source(text: str) -> str:
    """A checkpoint file, a folder (a run, an export, a diffusers pipeline) or the Hub id ``owner/name`` of one."""
    if looks_like_hub_id(text):
        return text
    _existing(text)
    return text


def config_source(text: str) -> str:
    """A preset name or a YAML file."""
    if text in PRESETS:
        return text
    path = Path(text)
    if not path.exists():
        raise Invalid(f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    return existing_file(text)


def add_minisd_arg(g) -> None:
    """--minisd, the miniSD a control branch shipped alone is paired with (the model-source flags and
    ``featinv convert``)."""
    g.add_argument("--minisd", type=checkpoint_source,
                   help="miniSD checkpoint (UNet, VAE, text encoder: a .ckpt, .safetensors, diffusers folder or Hub "
                        "id) for a checkpoint that holds the control branch alone (control_model.*, the adapter); "
                        "the two load as one model")


def add_source_args(p: argparse.ArgumentParser, demo: bool) -> argparse._ArgumentGroup:
    """The model-source flags as a group ("model"), read back by :func:`source_from_args`: --checkpoint and
    where its backbone comes from; with ``demo`` the checkpoint is optional and the demo pair's flags come too.
    -> the group (a face adds its --device to it)."""
    title = "model (default: the demo's digits pair, trained and cached on first use)" if demo else "model"
    g = p.add_argument_group(title)
    g.add_argument("--checkpoint", required=not demo, type=checkpoint_source,
                   help=f"FeatInv weights: a .safetensors file or a reference .ckpt, a folder holding "
                        f"{WEIGHTS_FILE} (a training run, an export) or an exported folder's Hub id"
                        + ("; without it the demo pair under --demo-out" if demo else ""))
    add_minisd_arg(g)
    g.add_argument("--config", type=config_source, help="preset name or YAML for the model and backbone (default: "
                   f"the model from the checkpoint's metadata, the backbone from the training run's {RUN_CONFIG})")
    g.add_argument("--run-dir", type=existing_dir, help=f"the training run whose {RUN_CONFIG} names the backbone "
                   f"(default: the checkpoint's folder, when it holds a {RUN_CONFIG})")
    g.add_argument("--backbone", help=f"backbone preset ({', '.join(BACKBONE_PRESETS)}) or timm name "
                                      "(default: the run's or --config's backbone)")
    g.add_argument("--backbone-checkpoint", type=existing_file, help="local backbone weights file (offline use)")
    g.add_argument("--backbone-size", type=positive_int, help="backbone input size (default: the backbone preset's)")
    if demo:
        g.add_argument("--demo-out", default=DEMO_OUT, help="the demo's folder (its cache/ holds the demo pair)")
        g.add_argument("--demo-seed", type=int, default=0, help="seed of the demo pair")
        g.add_argument("--demo-full", action="store_true",
                       help="the demo pair with `featinv demo`'s full settings (default: its --quick settings)")
    return g


def source_from_args(args: argparse.Namespace) -> PairSource:
    """The parsed flags of :func:`add_source_args` -> the PairSource they name (the demo's fields, when the
    face has no demo flags, keep their defaults). ValueError for --minisd without --checkpoint."""
    if args.minisd is not None and args.checkpoint is None:
        raise ValueError("--minisd: goes with --checkpoint (a control branch shipped alone, paired with this miniSD)")
    demo = {"demo_out": args.demo_out, "demo_seed": args.demo_seed, "demo_quick": not args.demo_full} \
        if hasattr(args, "demo_out") else {}
    return PairSource(checkpoint=args.checkpoint, minisd=args.minisd, config=args.config, run_dir=args.run_dir,
                      backbone=args.backbone,
                      backbone_checkpoint=args.backbone_checkpoint, backbone_size=args.backbone_size, **demo)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads (the faces that run long on a CPU)."""
    p.add_argument("--threads", type=count, default=0,
                   help="CPU threads for torch (0: OMP_NUM_THREADS, else one less than the usable cores)")
