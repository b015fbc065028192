"""The ``featinv app`` command: load a pair, build the page, serve it on 127.0.0.1 and print the URL."""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys

from featinv.commands._args import add_source_args, add_threads_arg, existing_dir, port, source_from_args
from featinv.commands._common import Parser, command
from featinv.registry import PANELS, describe, names

DESCRIPTION = (f"Serve the interactive explorer on a local web page: {names(PANELS)} (described below), each a "
               "tab over one input image. Without --checkpoint it serves the demo's digits pair, trained and "
               "cached on first use.")


def build_parser() -> Parser:
    p = Parser(prog="featinv app", description=DESCRIPTION, epilog="panels:\n" + describe(PANELS))
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=None, help="port (default: the first free one from 7860 on)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off unless asked)")
    g = add_source_args(p, demo=True)
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--examples", type=existing_dir, help="folder of example images to offer (with --checkpoint)")
    add_threads_arg(p)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("gradio is not installed; pip install 'featinv[app]'")
    source_from_args(args)  # the model-source flags' own checks (--minisd goes with --checkpoint)
    if args.examples and args.checkpoint is None:
        raise ValueError("--examples: offered with --checkpoint (the demo pair offers its own held-out digits)")
    if args.port is not None:
        check_port(args.host, args.port)
    return args


def check_port(host: str, number: int) -> None:
    """ValueError naming --host/--port unless the address can be served on (checked before the model loads)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, number))
    except OSError as e:
        raise ValueError(f"--host/--port: cannot serve on {host}:{number}: {e.strerror or e}") from None


def _session(args: argparse.Namespace, device: str):
    from featinv.app.session import checkpoint_session, demo_session

    source = source_from_args(args)
    if source.checkpoint is None:
        print(f"featinv app: loading the demo pair from {source.demo_out} (trained and cached on first use)",
              file=sys.stderr, flush=True)
        return demo_session(source.demo_out, seed=source.demo_seed, quick=source.demo_quick, device=device,
                            log=lambda *a: print(*a, file=sys.stderr, flush=True))
    examples = []
    if args.examples:
        from featinv.data import find_images

        examples = [path for path, _ in find_images(args.examples)[0]][:20]
    return checkpoint_session(source, device, examples)


@command("app", parse)
def main(args: argparse.Namespace) -> int:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check
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
