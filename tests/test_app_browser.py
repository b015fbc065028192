"""``featinv app`` in a real browser: headless Chromium (Debian's package) driven by Playwright.

Loads the page, uploads a digit (shown as the picture), runs Reconstruct (K images whose captions can be
read whole + the top-5 table), steers, moves the strength slider (the strip changes) and switches the
clamp off (the steered pictures change), composes (the table as wide as the panel), perturbs, clicks a
concept's picture (the concepts active there are listed), maps the digit rotated (a linear map fitted in the
page), uploads a file that is not an image (a message, no earlier result left under it), types a non-finite
seed (a message), and the app keeps answering.
Screenshots go to the test's tmp folder; FEATINV_APP_SCREENSHOT=1 also refreshes docs/app.png.
In CI (CI=true) a missing browser or Playwright fails instead of skipping.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from app_server import (
    ROOT,
    AppServer,
    captions,
    hidden_captions,
    launch_chromium,
    require_browser,
    run_reconstruct,
    wait_count,
    width_ratio,
)

from featinv.registry import PANELS

pytestmark = pytest.mark.slow
K = 4  # the Advanced section's default for the demo pair


@pytest.fixture(scope="module")
def server(quick_demo_out, tmp_path_factory):
    require_browser(app=True)
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


def _upload(page, path: Path, text: str | None = None) -> None:
    if text is not None:
        path.write_text(text)
    page.set_input_files("#upload input[type=file]", str(path))


def _sources(page, gallery: str) -> list[str]:
    """The gallery images' URLs: Gradio names each file by its content, so equal pixels give equal URLs."""
    return page.eval_on_selector_all(f"{gallery} img", "els => els.map(e => e.src)")


def _basis(demo_out: Path, folder: Path) -> Path:
    """A 4-concept nmf basis on the demo classifier's maps of 300 training digits."""
    import torch

    from featinv.analysis.concepts import fit_concepts
    from featinv.demo.pair import load_demo_pair

    pair = load_demo_pair(demo_out, log=lambda *a: None)
    with torch.no_grad():
        feats = pair.extractor(pair.data["x_train"][:300].expand(-1, 3, -1, -1))
    return fit_concepts(feats, 4, "nmf", seed=0).save(folder / "concepts.safetensors")


def test_app_in_browser(server, page, quick_demo_out, tmp_path):
    digits = _examples(quick_demo_out)
    assert len(digits) == 10, digits
    t0 = time.perf_counter()
    page.goto(server.url, timeout=60_000)
    page.wait_for_selector("#reconstruct-run")
    for tab in PANELS:  # the registry's, Concepts too
        assert page.locator(f"button[role=tab]:has-text('{tab}')").count() == 1, tab
    load = time.perf_counter() - t0

    # The upload is shown as the picture (not a file name), next to the input as the classifier sees it
    _upload(page, digits["digit3"])
    page.wait_for_selector("#preview img")
    assert "digit3" in page.get_attribute("#upload img", "src")

    # Reconstruct: K images whose captions (top-1 and cosine) can be read whole, a 5-row top-5 table
    seconds = run_reconstruct(page, K)
    alts = captions(page, "#reconstruct-gallery")
    assert [a.split(":")[0] for a in alts] == [f"sample {i + 1}" for i in range(K)]
    assert all("cos\xa0" in a for a in alts), alts  # a no-break space: "cos 0.927" is never split
    assert hidden_captions(page, "#reconstruct-gallery") == []
    assert page.inner_text("#reconstruct-gallery").count("cos") == K
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
    assert page.is_checked("#steer-clamp input[value='per channel']")  # the clamp is on by default
    page.click("#steer-run")
    wait_count(page, "#steer-strip img", 5)
    page.wait_for_function("document.querySelectorAll('#steer-strip img').length == 5")
    before = captions(page, "#steer-strip")
    assert before[0].startswith("α +0.00") and before[-1].startswith("α +2.00"), before
    assert hidden_captions(page, "#steer-strip") == []
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
    # ... and the clamp control changes the steered pictures, never the unsteered one (alpha = 0)
    clamped = _sources(page, "#steer-strip")
    page.click("#steer-clamp label:has-text('none')")
    page.click("#steer-run")
    page.wait_for_function("([old]) => { const s = [...document.querySelectorAll('#steer-strip img')].map(e => e.src);"
                           " return s.length == 5 && s[4] != old[4]; }", arg=[clamped])
    free = _sources(page, "#steer-strip")
    assert free[0] == clamped[0] and free[1:] != clamped[1:], (clamped, free)

    # Compose (A = the shared input, B = another digit): the table as wide as the panel
    page.click("button[role=tab]:has-text('Compose')")
    page.set_input_files("#upload-b input[type=file]", str(digits["digit8"]))
    page.wait_for_selector("#upload-b img")
    page.click("#compose-run")
    wait_count(page, "#compose-gallery img", 2 + K)
    assert "cosine" in page.inner_text("#compose-cosine")
    assert hidden_captions(page, "#compose-gallery") == []
    assert width_ratio(page, "#compose-table", "#compose-gallery") > 0.95
    page.screenshot(path=tmp_path / "compose.png", full_page=True)
    page.click("button[role=tab]:has-text('Perturb')")
    page.click("#perturb-run")
    wait_count(page, "#perturb-perturbed img", 1 + K)
    assert captions(page, "#perturb-clean")[0].startswith("clean: ")
    assert hidden_captions(page, "#perturb-perturbed") == []
    page.screenshot(path=tmp_path / "perturb.png", full_page=True)

    # Concepts: show a concept of a basis, then click the picture: the concepts active at that cell are listed
    page.click("button[role=tab]:has-text('Concepts')")
    page.set_input_files("#concepts-basis input[type=file]", str(_basis(quick_demo_out, tmp_path)))
    page.click("#concepts-run")
    wait_count(page, "#concepts-strip img", 5)
    page.wait_for_function("(() => { const i = document.querySelector('#concepts-heat img');"
                           " return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; })()")
    heat = page.locator("#concepts-heat img")
    box = heat.bounding_box()  # once the picture has loaded (before, it is 0 pixels wide)
    heat.click(position={"x": box["width"] * 0.75, "y": box["height"] * 0.75})  # the 2x2 grid's cell (1, 1)
    page.wait_for_function("document.querySelector('#concepts-at-note').innerText.includes("
                           "'lies in cell (1, 1) of the 2x2 feature grid')", timeout=30_000)
    assert page.locator("#concepts-at [role=grid]").count() == 1
    page.screenshot(path=tmp_path / "concepts.png", full_page=True)

    # Maps: pick a manipulation (its value box takes its default), fit a linear map on the training digits: input |
    # rotated | the rotated digit's own map and the input's mapped map, reconstructed; the table of those maps
    page.click("button[role=tab]:has-text('Maps')")
    page.click("#maps-manipulation input")
    page.click("#maps-manipulation li[aria-label=rotate]")
    page.wait_for_function("document.querySelector('#maps-value input').value == '30'")
    page.click("#maps-run")
    wait_count(page, "#maps-gallery img", 4)
    alts = captions(page, "#maps-gallery")
    assert [a.split(": ")[0] for a in alts] == ["input", "rotate:30", "own map reconstructed",
                                                "mapped (linear) reconstructed"], alts
    assert hidden_captions(page, "#maps-gallery") == []
    page.wait_for_function("document.querySelector('#maps-table [role=grid]')?.getAttribute('aria-rowcount') == '4'")
    assert "fitted on" in page.inner_text("#maps-note")
    page.screenshot(path=tmp_path / "maps.png", full_page=True)

    # A file that is not an image: a message in the page, no traceback, no earlier result left
    page.click("button[role=tab]:has-text('Reconstruct')")
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    page.click("#upload button[aria-label='Remove Image']")
    _upload(page, fake)
    page.get_by_text("is not an image this app can read").first.wait_for(timeout=30_000)
    page.click("#reconstruct-run")
    page.wait_for_function("document.querySelector('#reconstruct-cosine').innerText.trim() == ''")
    assert page.locator("#reconstruct-gallery img").count() == 0  # emptied, not the 3's samples under a badge
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=tmp_path / "error.png", full_page=True)
    page.click("#upload button[aria-label='Remove Image']")
    _upload(page, tmp_path.joinpath("notes.txt"), text="plain text\n")  # refused by the page itself
    page.get_by_text("Invalid file type").first.wait_for(timeout=30_000)

    # A number that is not finite (typed into the Advanced section): a message naming the setting
    page.click("text=Advanced: sampler settings")
    page.fill("#seed input", "1e999")
    _upload(page, digits["digit7"])
    page.wait_for_selector("#preview img")
    page.click("#reconstruct-run")
    page.get_by_text(re.compile(r"seed(:| =) .*number")).first.wait_for(timeout=30_000)
    page.fill("#seed input", "0")
    run_reconstruct(page, K)
    assert "mean" in page.inner_text("#reconstruct-cosine")
    assert page.outside_requests == [], page.outside_requests  # the page works offline
    assert server.proc.poll() is None, server.log()
    print(f"\napp start {server.start_seconds:.1f} s, page load {load:.2f} s, reconstruct K={K} round trip "
          f"{seconds:.2f} s; screenshots in {tmp_path}")
