"""``featinv app`` in a real browser: headless Chromium (Debian's package) driven by Playwright.

Loads the page, uploads a digit, runs Reconstruct (K images + the top-5 table), steers and moves the
strength slider (the strip changes), uploads a text file (a message, and the app keeps answering).
Screenshots go to the test's tmp folder; FEATINV_APP_SCREENSHOT=1 also refreshes docs/app.png.
In CI (CI=true) a missing browser or Playwright fails instead of skipping.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from app_server import ROOT, AppServer, captions, launch_chromium, run_reconstruct, wait_count

pytestmark = pytest.mark.slow
K = 4  # the Advanced section's default for the demo pair


def _require_browser():
    missing = []
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


@pytest.fixture(scope="module")
def server(quick_demo_out, tmp_path_factory):
    _require_browser()
    app = AppServer(quick_demo_out, tmp_path_factory.mktemp("gradio"))
    yield app
    app.stop()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(60_000)
            outside = []
            pg.on("request", lambda r: outside.append(r.url)
                  if not r.url.startswith((server.url, "data:", "blob:")) else None)
            pg.outside_requests = outside
            yield pg
        finally:
            browser.close()


def _examples(demo_out: Path) -> dict[str, Path]:
    return {p.stem: p for p in demo_out.glob("cache/*/app_examples/digit*.png")}


def _upload(page, path: Path) -> None:
    page.set_input_files("#upload input[type=file]", str(path))


def test_app_in_browser(server, page, quick_demo_out, tmp_path):
    digits = _examples(quick_demo_out)
    assert len(digits) == 10, digits
    t0 = time.perf_counter()
    page.goto(server.url, timeout=60_000)
    page.wait_for_selector("#reconstruct-run")
    for tab in ("Reconstruct", "Steer", "Compose", "Perturb"):
        assert page.locator(f"button[role=tab]:has-text('{tab}')").count() == 1, tab
    load = time.perf_counter() - t0

    # Reconstruct: K images in the gallery, a 5-row top-5 table, the uncertainty map
    _upload(page, digits["digit3"])
    page.wait_for_selector("#preview img")
    seconds = run_reconstruct(page, K)
    alts = captions(page, "#reconstruct-gallery")
    assert [a.split(":")[0] for a in alts] == [f"sample {i + 1}" for i in range(K)]
    assert all("cos " in a for a in alts), alts
    table = page.inner_text("#reconstruct-table")
    for column in ["rank", "original"] + [f"sample {i + 1}" for i in range(K)]:
        assert column in table, (column, table)
    assert page.locator("#reconstruct-uncertainty img").count() == 1
    assert "mean" in page.inner_text("#reconstruct-cosine")
    page.screenshot(path=tmp_path / "reconstruct.png", full_page=True)
    if os.environ.get("FEATINV_APP_SCREENSHOT"):
        page.screenshot(path=ROOT / "docs" / "app.png", full_page=True)

    # Steer: a strip over strengths; moving the slider reruns it with other strengths
    page.click("button[role=tab]:has-text('Steer')")
    page.click("#steer-run")
    wait_count(page, "#steer-strip img", 5)
    page.wait_for_function("document.querySelectorAll('#steer-strip img').length == 5")
    before = captions(page, "#steer-strip")
    assert before[0].startswith("α +0.00") and before[-1].startswith("α +2.00"), before
    slider = page.locator("#steer-strength input[type=range]").bounding_box()
    page.mouse.click(slider["x"] + slider["width"] * 0.95, slider["y"] + slider["height"] / 2)  # ~ +3.5
    page.wait_for_function("([old]) => { const alts = [...document.querySelectorAll('#steer-strip img')]"
                           ".map(e => e.alt); return alts.length == 5 && alts.join('|') != old.join('|'); }",
                           arg=[before])
    after = captions(page, "#steer-strip")
    assert after[0].startswith("α +0.00") and not after[-1].startswith("α +2.00"), after
    page.wait_for_function("([a]) => document.querySelector('#steer-table').innerText.includes(a)",
                           arg=[after[-1].split(":")[0][2:]])  # the table follows the strip
    page.screenshot(path=tmp_path / "steer.png", full_page=True)

    # Compose (A = the shared input, B = another digit) and Perturb answer with their galleries
    page.click("button[role=tab]:has-text('Compose')")
    page.set_input_files("#upload-b input[type=file]", str(digits["digit8"]))
    page.click("#compose-run")
    wait_count(page, "#compose-gallery img", 2 + K)
    assert "cosine" in page.inner_text("#compose-cosine")
    page.click("button[role=tab]:has-text('Perturb')")
    page.click("#perturb-run")
    wait_count(page, "#perturb-perturbed img", 1 + K)
    assert captions(page, "#perturb-clean")[0].startswith("clean: ")
    page.screenshot(path=tmp_path / "perturb.png", full_page=True)

    # A text file: a message in the page, no traceback; then the app still answers
    page.click("button[role=tab]:has-text('Reconstruct')")
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    page.click("#upload button[aria-label='Clear']")
    _upload(page, notes)
    page.get_by_text("is not an image this app can read").first.wait_for(timeout=30_000)
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=tmp_path / "error.png", full_page=True)
    page.click("#upload button[aria-label='Clear']")
    _upload(page, digits["digit7"])
    page.wait_for_selector("#preview img")
    run_reconstruct(page, K)
    assert page.outside_requests == [], page.outside_requests  # the page works offline
    assert server.proc.poll() is None, server.log()
    print(f"\napp start {server.start_seconds:.1f} s, page load {load:.2f} s, reconstruct K={K} round trip "
          f"{seconds:.2f} s; screenshots in {tmp_path}")
