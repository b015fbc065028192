"""Perturb: a corruption or a PGD attack on the input, reconstructed beside the clean image."""
from __future__ import annotations

import gradio as gr
import torch

from featinv.analysis import perturb
from featinv.app.session import Session, number
from featinv.app.show import KEY, classify, label, no_progress, tile, topk_table
from featinv.app.widgets import Panel, Shared, Wiring, gallery, top5_table
from featinv.config import SampleConfig

PGD = "PGD attack"
PERTURBATIONS = tuple(perturb.CORRUPTIONS) + (PGD,)
MAX_EPS_255 = 128     # PGD budget, in 1/255 steps of intensity
MAX_PGD_STEPS = 100


def _attack(session: Session, image: torch.Tensor, clean_probs: torch.Tensor, eps_255, steps, target: str,
            progress) -> tuple[torch.Tensor, str]:
    """An L∞ PGD attack (budget eps/255, ``steps`` steps, towards ``target`` unless "untargeted") -> (the
    attacked image, its description)."""
    eps_255 = number(eps_255, "PGD budget eps (/255)", 1, MAX_EPS_255)
    steps = number(steps, "PGD steps", 1, MAX_PGD_STEPS, whole=True)
    goal = None
    if target and target != "untargeted":
        if target not in session.class_names:
            raise ValueError(f"target class {target!r} is not one of the classifier's classes")
        goal = torch.tensor([session.class_names.index(target)], device=session.device)
    progress(0.05, f"PGD: {int(steps)} steps, eps {eps_255:g}/255")
    attacked = perturb.pgd(session.extractor, image, clean_probs.argmax(dim=-1), eps_255 / 255, int(steps),
                           target=goal)
    return attacked, f"PGD eps {eps_255:g}/255" + (f" → {target}" if goal is not None else "")


def run(session: Session, path: str | None, kind: str, severity, eps_255, steps, target: str, *,
        cfg: SampleConfig, progress=no_progress):
    """A corruption (severity 1-3) or a PGD attack -> (the clean input and its K reconstructions, the perturbed
    input and its K reconstructions, all captioned with the classifier's top-1; the top-5 table)."""
    image = session.load_image(path)
    _, clean_probs = classify(session, image)
    if kind == PGD:
        attacked, what = _attack(session, image, clean_probs, eps_255, steps, target, progress)
    else:
        severity = number(severity, "corruption severity", 1, 3, whole=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        attacked = perturb.corrupt(image, kind, int(severity), generator=generator)
        what = f"{kind} severity {int(severity)}"
    progress(0.2, f"sampling {cfg.num_samples} reconstructions of each")
    rec = session.reconstructor(cfg)
    samples = rec.from_features(rec.features(torch.cat([image, attacked])), [KEY, KEY])  # (2, K, 3, H, W)
    progress(0.9, "classifying")
    _, attacked_probs = classify(session, attacked)
    _, rec_probs = classify(session, samples.flatten(0, 1))
    k = cfg.num_samples
    clean = [(tile(image[0]), f"clean: {label(session, clean_probs[0])}")]
    clean += [(tile(samples[0, i]), f"clean sample {i + 1}: {label(session, rec_probs[i])}") for i in range(k)]
    bad = [(tile(attacked[0]), f"{what}: {label(session, attacked_probs[0])}")]
    bad += [(tile(samples[1, i]), f"perturbed sample {i + 1}: {label(session, rec_probs[k + i])}") for i in range(k)]
    table = topk_table(session, torch.cat([clean_probs, rec_probs[:1], attacked_probs, rec_probs[k:k + 1]]),
                       ["clean", "clean sample 1", "perturbed", "perturbed sample 1"])
    return clean, bad, table


def build(shared: Shared) -> Wiring:
    with gr.Row():
        kind = gr.Dropdown(list(PERTURBATIONS), value=PERTURBATIONS[0], label="perturbation", elem_id="perturb-kind")
        severity = gr.Slider(1, 3, value=2, step=1, label="corruption severity")
        eps = gr.Slider(1, MAX_EPS_255, value=32, step=1, label="PGD budget eps (/255)")
        steps = gr.Slider(1, MAX_PGD_STEPS, value=10, step=1, label="PGD steps")
        target = gr.Dropdown(["untargeted"] + shared.session.class_names, value="untargeted", label="PGD target")
    go = gr.Button("Perturb", variant="primary", elem_id="perturb-run")
    clean = gallery("clean input and its reconstructions", 5, "perturb-clean")
    attacked = gallery("perturbed input and its reconstructions", 5, "perturb-perturbed")
    table = top5_table("top-5", "perturb-table", ["clean", "clean sample 1", "perturbed", "perturbed sample 1"])
    return Wiring([go.click], [shared.upload, kind, severity, eps, steps, target], [clean, attacked, table])


PANEL = Panel(run, build)
