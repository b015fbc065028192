"""A trained FeatInv model as a shareable folder (a Hugging Face Hub model repo as it is uploaded).

    OUT/featinv.safetensors   the full model (reference keys, config in the metadata), as load_featinv reads it
    OUT/config.yaml           the training run's config (model, backbone, data, train)
    OUT/README.md             the model card: YAML front matter the Hub reads, then a short text

``load_featinv`` and :func:`featinv.checkpoint.load.resolve_featinv_source` accept such a folder, or its Hub id.
The folder is written beside OUT and renamed onto it at the end: a failure leaves no half-written export.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from featinv.checkpoint.config_file import load_config, to_dict
from featinv.checkpoint.layout import EXPORT_FILES, METADATA_KEY
from featinv.checkpoint.load import read_checkpoint, resolve_featinv_source
from featinv.config import EVAL_DIR, RUN_CONFIG, WEIGHTS_FILE
from featinv.io import atomic_save, atomic_write_text

LIBRARY_NAME = "featinv"


def front_matter(path: str | Path) -> dict | None:
    """The YAML front matter (between the leading ``---`` lines) of a Markdown file, or None."""
    text = Path(path).read_text()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    data = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    return data if isinstance(data, dict) else None


def is_export(folder: str | Path) -> bool:
    """True for a folder written by :func:`export_featinv` (only its files; a featinv model card)."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()}
    card = folder / "README.md"
    if not names <= set(EXPORT_FILES) or not card.is_file():
        return False
    return (front_matter(card) or {}).get("library_name") == LIBRARY_NAME


def read_evaluation(path: str | Path) -> dict:
    """The ``featinv evaluate`` summary: a reconstruct folder, its ``eval/`` folder or ``summary.json``."""
    path = Path(path)
    for candidate in (path / EVAL_DIR / "summary.json", path / "summary.json", path):
        if candidate.is_file():
            summary = json.loads(candidate.read_text())
            if not isinstance(summary, dict) or "top1" not in summary:
                raise ValueError(f"{candidate}: not a `featinv evaluate` summary.json")
            return summary
    raise FileNotFoundError(f"--eval: no evaluate summary in {path} (expected eval/summary.json, as "
                            "`featinv evaluate --out FOLDER` writes)")


def checkpoint_facts(weights: Path) -> tuple[int | None, bool]:
    """(optimizer steps behind a checkpoint: featinv metadata, else a Lightning file's global_step; whether
    the file is a featinv safetensors with its config in the metadata, which is exported as it is)."""
    _, metadata, container = read_checkpoint(weights)
    step = metadata.get("featinv_train_steps", (container or {}).get("global_step"))
    return (int(step) if step is not None else None), METADATA_KEY in metadata


def model_card(run: dict, steps: int | None, evaluation: dict | None, license: str, base_model: str | None) -> str:
    """README.md text: front matter (library, license, base model, tags, backbone, layer, steps), then prose."""
    from featinv.jobs.evaluate import markdown

    backbone = run["backbone"]
    meta = {"library_name": LIBRARY_NAME, "license": license}
    if base_model:
        meta["base_model"] = base_model
    meta["tags"] = ["featinv", "feature-inversion", "controlnet", "stable-diffusion", backbone["name"].split(".")[0]]
    meta["featinv"] = {"backbone": backbone["name"], "layer": backbone["layer"], "image_size": backbone["image_size"],
                       "train_steps": steps, "feature_channels": run["model"]["adapter"]["in_channels"]}
    if evaluation:
        meta["featinv"]["evaluation"] = {k: evaluation[k] for k in ("images", "top1", "top5", "cos_pooled",
                                                                    "cos_spatial", "fid") if k in evaluation}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# FeatInv for {backbone['name']}, layer {backbone['layer']}", "",
             "A ControlNet-conditioned latent diffusion model that maps this classifier's spatial feature maps back "
             "to images (FeatInv, arXiv 2505.21032), trained with "
             f"featinv for {steps if steps is not None else 'an unrecorded number of'} steps"
             + (f" from `{base_model}`." if base_model else "."), "",
             "```bash", "featinv reconstruct --checkpoint THIS_FOLDER_OR_HUB_ID ...", "```", "",
             "`config.yaml` is the training run's config (model, backbone, data, training)."]
    if evaluation:
        table = markdown(evaluation).splitlines()[1:]  # without its "# Evaluation" heading
        lines += ["", f"## Evaluation ({evaluation.get('backbone', backbone['name'])})", *table]
    return "\n".join(lines).rstrip() + "\n"


def export_featinv(source: str | Path, out: str | Path, evaluation: str | Path | None = None,
                   config: str | Path | None = None, license: str = "apache-2.0",
                   base_model: str | None = None) -> dict:
    """Write the shareable folder ``out`` from a training run folder, a FeatInv checkpoint or an earlier
    export; returns ``{"out", "weights", "config", "train_steps", "evaluation"}``.

    config: the run's config.yaml (default: the one beside the checkpoint; required). evaluation: a
    reconstruct folder evaluated by ``featinv evaluate`` (its table goes into the card). Refuses a
    non-empty ``out`` that is not an earlier export (which is replaced)."""
    from featinv.checkpoint.load import load_featinv, save_featinv

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_export(out))):
        raise FileExistsError(f"{out} exists and is not an earlier `featinv export` folder; refusing to overwrite it")
    weights, found_config = resolve_featinv_source(source)
    config = Path(config) if config else found_config
    if config is None:
        raise FileNotFoundError(f"no run config.yaml beside {weights}: pass --config (the training run's config.yaml)")
    run = to_dict(load_config(str(config)))  # a valid run config, or a ValueError naming the key
    model = load_featinv(weights)  # strict: a complete, finite FeatInv model
    steps, as_is = checkpoint_facts(weights)
    summary = read_evaluation(evaluation) if evaluation else None
    card = model_card(run, steps, summary, license, base_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if as_is:
            atomic_save(lambda t: shutil.copyfile(weights, t), tmp / WEIGHTS_FILE)  # the file as trained, bit for bit
        else:
            steps_meta = {"featinv_train_steps": str(steps)} if steps is not None else None
            save_featinv(model, tmp / WEIGHTS_FILE, steps_meta)
        atomic_save(lambda t: shutil.copyfile(config, t), tmp / RUN_CONFIG)
        atomic_write_text(card, tmp / "README.md")
        if out.exists():  # an earlier export, or empty: replaced as a whole
            old = out.rename(tmp.with_suffix(".old"))
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "weights": str(weights), "config": str(config), "train_steps": steps,
            "evaluation": summary is not None}
