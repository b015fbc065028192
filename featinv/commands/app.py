"""The ``featinv app`` command: load a pair, build the page, serve it on 127.0.0.1 and print the URL."""
from __future__ import annotations

import argparse
import os

import torch

from featinv.commands._common import Parser, command
from featinv.config import DEMO_OUT, PairSource
from featinv.nets.backbone import BACKBONE_PRESETS
from featinv.runtime import configure_threads

DESCRIPTION = ("Serve the interactive explorer (Reconstruct, Steer, Compose, Perturb) on a local web page. "
               "Without --checkpoint it serves the demo's digits pair, trained and cached on first use.")


def build_parser() -> Parser:
    p = Parser(prog="featinv app", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860 on)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off unless asked)")
    p.add_argument("--demo-out", default=DEMO_OUT, help="the demo's out folder (its cache/ holds the pair)")
    p.add_argument("--demo-seed", type=int, default=0, help="seed of the demo pair")
    p.add_argument("--demo-full", action="store_true", help="the demo's default settings instead of --quick's")
    p.add_argument("--checkpoint", help="FeatInv weights (.safetensors) or a training run folder "
                                        "(featinv.safetensors + config.yaml); serves that model instead of the demo")
    p.add_argument("--config", help="preset name or YAML for the model and backbone "
                                    "(None: the checkpoint's metadata / the run folder's config.yaml)")
    p.add_argument("--backbone", help=f"backbone preset ({', '.join(BACKBONE_PRESETS)}) or timm name "
                                      "(default: the run's config.yaml)")
    p.add_argument("--backbone-checkpoint", help="local backbone weights file (offline use)")
    p.add_argument("--backbone-size", type=int, help="backbone input size (None: the preset's)")
    p.add_argument("--examples", help="folder of example images to offer (with --checkpoint)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: OMP_NUM_THREADS, else one less than the usable cores)")
    return p


def _session(args: argparse.Namespace, device: str):
    from featinv.app.session import checkpoint_session, demo_session

    if args.checkpoint is None:
        print(f"featinv app: loading the demo pair from {args.demo_out} (trained and cached on first use)", flush=True)
        return demo_session(args.demo_out, seed=args.demo_seed, quick=not args.demo_full, device=device,
                            log=lambda *a: print(*a, flush=True))
    examples = []
    if args.examples:
        from featinv.data import find_images

        examples = [path for path, _ in find_images(args.examples)[0]][:20]
    source = PairSource(checkpoint=args.checkpoint, config=args.config, backbone=args.backbone,
                        backbone_checkpoint=args.backbone_checkpoint, backbone_size=args.backbone_size)
    return checkpoint_session(source, device, examples)


@command("app")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    configure_threads(args.threads)  # 0: the commands' rule (featinv.runtime.default_threads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("gradio is not installed; pip install 'featinv[app]'") from None
    session = _session(args, device)
    from featinv.app.ui import CSS, build

    page = build(session)
    page.queue(default_concurrency_limit=1)  # one model, one worker: requests wait their turn
    try:
        _, url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                        prevent_thread_lock=True, quiet=True, ssr_mode=False, show_error=False,
                                        max_file_size="20mb", css=CSS)
    except OSError as e:
        raise ValueError(f"--host/--port: cannot serve on {args.host}:{args.port}: {e}") from None
    print(f"featinv app: serving {session.name} at {url}" + (f" (public: {share_url})" if share_url else ""),
          flush=True)
    try:
        page.block_thread()  # until Ctrl-C / SIGTERM
    finally:
        page.close()
    return 0
