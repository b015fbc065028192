"""Start ``featinv app`` in a subprocess and drive it with headless Chromium (shared by the browser test
and benchmarks/bench_app.py). Everything has a timeout, so a hang fails instead of stalling CI."""
from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"featinv app: serving .* at (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python -m featinv app --demo-out <out> --port <free>``; ``url`` once it serves."""

    def __init__(self, demo_out: Path, temp_dir: Path, timeout: float = 180.0, threads: int = 1):
        env = {**os.environ, "GRADIO_TEMP_DIR": str(temp_dir), "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONUNBUFFERED": "1"}
        self.port = free_port()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featinv", "app", "--demo-out", str(demo_out), "--port", str(self.port),
             "--threads", str(threads)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        self.started = time.perf_counter()
        self.url = self._wait_for_url(lines, timeout)
        self.start_seconds = time.perf_counter() - self.started

    def _pump(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            lines.put(line)
        lines.put(None)

    def _wait_for_url(self, lines: queue.Queue, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.stop()
                raise RuntimeError("featinv app exited before serving:\n" + "".join(self.lines[-30:]))
            match = URL_LINE.search(line)
            if match:
                return match.group(1)
        self.stop()
        raise TimeoutError(f"featinv app printed no URL within {timeout:.0f} s:\n" + "".join(self.lines[-30:]))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def require_browser(app: bool = False) -> None:
    """Skip the test (fail it under CI=true) unless Playwright, Debian's chromium and, for the app, gradio are
    installed, saying what is missing."""
    import pytest

    missing = []
    if app:
        try:
            import gradio  # noqa: F401
        except ImportError:
            missing.append("gradio (pip install -e '.[app]')")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if shutil.which("chromium") is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        reason = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- required in CI")
        pytest.skip(reason)


def launch_chromium(playwright):
    """Debian's chromium (browser downloads are not possible here) through Playwright."""
    return playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"],
                                      timeout=60_000)


def count(page, selector: str) -> int:
    return page.evaluate("s => document.querySelectorAll(s).length", selector)


def wait_count(page, selector: str, n: int, timeout_ms: int = 60_000) -> None:
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length >= n", arg=[selector, n],
                           timeout=timeout_ms)


def captions(page, gallery: str) -> list[str]:
    """The alt texts (= captions) of a gallery's images, in order (as the page has them: "91\xa0%")."""
    return page.eval_on_selector_all(f"{gallery} img", "els => els.map(e => e.alt)")


def hidden_captions(page, gallery: str) -> list[str]:
    """The gallery's caption labels a user cannot read whole: cut (ellipsis, overflow) or drawn outside
    their picture's tile or the gallery's box (which clip them). [] when every caption is fully visible."""
    return page.eval_on_selector_all(f"{gallery} .caption-label", """els => els.filter(e => {
        const r = e.getBoundingClientRect(), tile = e.closest('.thumbnail-item').getBoundingClientRect();
        const box = e.closest('.block').getBoundingClientRect();
        const inside = (a, b) => a.left >= b.left - 1 && a.right <= b.right + 1 && a.top >= b.top - 1
                                 && a.bottom <= b.bottom + 1;
        return e.scrollWidth > e.clientWidth || e.scrollHeight > e.clientHeight || !inside(r, tile)
               || !inside(r, box) || r.width == 0;
    }).map(e => e.innerText)""")


def width_ratio(page, selector: str, container: str) -> float:
    """Width of ``selector`` over the width of ``container`` (both as laid out in the page)."""
    return page.evaluate("([s, c]) => document.querySelector(s).getBoundingClientRect().width"
                         " / document.querySelector(c).getBoundingClientRect().width", [selector, container])


def run_reconstruct(page, k: int) -> float:
    """Click Reconstruct; seconds until K captioned images and the 5-row top-5 table are shown."""
    old = captions(page, "#reconstruct-gallery")
    t0 = time.perf_counter()
    page.click("#reconstruct-run")
    page.wait_for_function(
        "([k, old]) => { const alts = [...document.querySelectorAll('#reconstruct-gallery img')].map(e => e.alt);"
        " return alts.length == k && alts.join('|') != old.join('|'); }", arg=[k, old], timeout=60_000)
    page.wait_for_function("document.querySelector('#reconstruct-table [role=grid]')"
                           "?.getAttribute('aria-rowcount') == '6'", timeout=60_000)
    return time.perf_counter() - t0
