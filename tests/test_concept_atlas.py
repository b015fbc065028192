"""The concept index (one streamed pass) against a brute-force computation on all codes at once, its summary in
the basis file, and the static HTML atlas in headless Chromium (Debian's package, driven by Playwright).
In CI (CI=true) a missing browser or Playwright fails instead of skipping."""
from __future__ import annotations

import json

import pytest
import torch

from featinv.analysis.atlas_html import atlas_payload, write_atlas_html
from featinv.analysis.concept_index import concept_index, exact_removal, feature_batches
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import ConceptBasis, method_of
from featinv.demo.digits import DigitsCNN, make_extractor
from featinv.nets.sae import SparseAutoencoder

INDEX_KEYS = {"images", "frequency", "mean_code", "classes", "importance"}


def sae_basis(k: int, channels: int = 64, top_k: int = 4, seed: int = 0, near: torch.Tensor | None = None
              ) -> ConceptBasis:
    """A random TopK SAE as a basis: unit decoder rows (random, or near k of the maps' vectors in ``near`` (N, C, h,
    w), so that every concept fires somewhere), the encoder their transpose (sparse, non-negative codes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = SparseAutoencoder(channels, k, top_k, "topk").state_dict()
    tensors = {name: torch.zeros_like(t) for name, t in shapes.items()}
    atoms = torch.randn(k, channels, generator=g)
    if near is not None:
        vectors = near.permute(0, 2, 3, 1).reshape(-1, channels)
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        atoms = vectors[torch.randperm(len(vectors), generator=g)[:k]] + 0.05 * atoms
    tensors["W_dec"] = torch.nn.functional.normalize(atoms, dim=1)
    tensors["W_enc"] = tensors["W_dec"].clone()
    return method_of("topk").basis_from_sae(tensors, top_k, "random sae")


@pytest.fixture(scope="module")
def maps():
    """A random DigitsCNN at 16 px (a 64 x 4 x 4 map, a head linear in the map), 45 random images and their maps."""
    torch.manual_seed(0)
    ext = make_extractor(DigitsCNN().eval(), 16)
    images = torch.rand(45, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ext(images)
    return ext, images, feats


def brute_force(basis, ext, feats, labels, top):
    """Everything the index holds, from all codes at once."""
    codes = basis.encode(feats)                                             # (N, k, h, w)
    active = (codes != 0).float()
    peaks = codes.amax(dim=(2, 3))                                          # (N, k)
    order = peaks.T.sort(dim=1, descending=True, stable=True).indices[:, :top]   # ties: the earlier image
    grids = torch.stack([codes[order[i], i] for i in range(basis.k)])        # (k, T, h, w)
    imp = concept_importance(basis, ext, feats, labels, codes)
    count = active.sum(dim=(0, 2, 3))
    return {"frequency": active.mean(dim=(0, 2, 3)), "mean_code": (codes.sum(dim=(0, 2, 3)) / count).nan_to_num(),
            "top_images": order, "top_peaks": peaks.T.gather(1, order), "top_grids": grids,
            "top_locations": grids.flatten(2).argmax(dim=2), "imp": imp,
            "quality": completeness(basis, feats, ext, codes)}


@pytest.fixture(scope="module")
def reference(maps):
    ext, _, feats = maps
    basis, labels = sae_basis(24), torch.arange(45) % 10
    return basis, labels, brute_force(basis, ext, feats, labels, 6)


@pytest.mark.parametrize("batch_size", [1, 7, 45, "uneven"])
def test_the_streamed_index_equals_brute_force_whatever_the_batch_size(maps, reference, batch_size):
    ext, _, feats = maps
    basis, labels, ref = reference
    batches = [feats[:3], feats[3:20], feats[20:21], feats[21:]] if batch_size == "uneven" else feats
    index = concept_index(basis, ext, batches, labels, top=6, batch_size=batch_size if batch_size != "uneven" else 1,
                          quality=True)
    assert index.images == 45 and index.grid == (4, 4) and index.k == 24
    assert torch.allclose(index.frequency, ref["frequency"])
    assert (index.frequency == 0).any() and (index.frequency > 0.1).any()   # dead concepts and busy ones
    assert torch.allclose(index.mean_code, ref["mean_code"], rtol=1e-5)
    assert torch.equal(index.top_images, ref["top_images"])                 # exact, ties included
    assert torch.equal(index.top_peaks, ref["top_peaks"]) and torch.equal(index.top_grids, ref["top_grids"])
    assert torch.equal(index.top_locations, ref["top_locations"])
    assert (index.top_peaks == 0).any()                                      # zero-peak ties were ranked too
    assert torch.allclose(index.importance, ref["imp"]["gradient"], atol=1e-5)
    assert torch.allclose(index.importance, ref["imp"]["removal"], atol=1e-4)  # the head is linear in the map
    assert torch.equal(index.class_counts, ref["imp"]["count"])
    for key, value in ref["quality"].items():
        assert index.quality[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_labels_default_to_the_top1_and_exact_removal_matches_concept_importance(maps):
    ext, images, feats = maps
    basis = sae_basis(16, seed=1)
    top1 = ext.logits_from_features(feats).argmax(1)
    index = concept_index(basis, ext, feature_batches(ext, images, batch_size=8), top=3)
    ref = concept_importance(basis, ext, feats, top1)
    assert torch.allclose(index.importance, ref["gradient"], atol=1e-5, equal_nan=True)
    assert torch.equal(index.class_counts, ref["count"])
    exact = exact_removal(basis, ext, feats, top1, [3, 0, 11], chunk=10)
    assert torch.allclose(exact, ref["removal"][[3, 0, 11]], atol=1e-5, equal_nan=True)
    assert index.quality is None and concept_index(basis, None, feats).importance is None


def test_the_summary_keeps_the_schema_the_app_reads(maps):
    ext, _, feats = maps
    basis = sae_basis(20, seed=2)
    index = concept_index(basis, ext, feats, torch.arange(45) % 10, top=4)
    summary = index.summary()
    assert set(summary) == INDEX_KEYS and summary["images"] == 45
    assert all(len(summary[key]) == 20 for key in INDEX_KEYS - {"images"})
    for i, (classes, top) in enumerate(zip(summary["classes"], summary["importance"])):
        drops = index.importance[i]
        assert len(classes) <= 3 and all(drops[c] > 0 for c in classes)
        assert [float(drops[c]) for c in classes] == sorted((float(drops[c]) for c in classes), reverse=True)
        expected = float(torch.nan_to_num(drops, nan=float("-inf")).max().clamp(min=0))
        assert top == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert classes == [] or top == pytest.approx(float(drops[classes[0]]), rel=1e-5)
    full = json.loads(json.dumps(index.to_json([f"im{n}" for n in range(45)], full=True), allow_nan=False))
    assert full["top_images"] == index.top_images.tolist() and len(full["image_names"]) == 45
    assert len(full["top_grids"]) == 20 and len(full["top_grids"][0][0]) == 4
    assert [len(d) for d in full["drops"]] == [len(c) for c in full["classes"]]
    assert [d[0] if d else 0.0 for d in full["drops"]] == full["importance"]
    assert "top_grids" not in index.to_json()


def test_bad_input_is_one_line(maps):
    ext, _, feats = maps
    basis = sae_basis(8)
    with pytest.raises(ValueError, match=r"labels: 44 labels for 45 feature maps"):
        concept_index(basis, ext, feats, torch.zeros(44, dtype=torch.long))
    with pytest.raises(ValueError, match=r"earlier maps have a 4x4 grid"):
        concept_index(basis, ext, [feats[:2], feats[:2, :, :2]])
    with pytest.raises(ValueError, match=r"class indices in 0\.\.9"):
        concept_index(basis, ext, feats, torch.full((45,), 10))
    with pytest.raises(ValueError, match=r"feature map has 3 channels but the concept basis was fitted on 64"):
        concept_index(basis, ext, torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no feature maps to index"):
        concept_index(basis, ext, [])
    index = concept_index(basis, ext, feats)
    with pytest.raises(ValueError, match=r"the atlas needs the index's 45 images"):
        atlas_payload(index, torch.rand(3, 3, 16, 16))


# ----- the HTML atlas in headless Chromium ---------------------------------------------------------

@pytest.fixture
def page():
    from app_server import launch_chromium, require_browser

    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 900})
            pg.set_default_timeout(30_000)
            pg.outside, pg.errors = [], []
            pg.on("request", lambda r: pg.outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            yield pg
        finally:
            browser.close()


def _match(page) -> int:
    return int(page.get_attribute("#count", "data-match"))


def _concepts(page) -> list[int]:
    return page.eval_on_selector_all("#rows tr", "rows => rows.map(r => +r.dataset.concept)")


def test_the_html_atlas_lists_every_concept_of_a_512_latent_basis(page, maps, tmp_path):
    ext, images, feats = maps
    basis = sae_basis(512, top_k=8, seed=3, near=feats)
    index = concept_index(basis, ext, feats, torch.arange(45) % 10, top=5)
    path = write_atlas_html(tmp_path / "atlas.html", index, images, [f"img{n}" for n in range(45)], drawn=[5, 9])
    text = path.read_text()
    assert "<script src" not in text and "<link" not in text and "http" not in text.replace("http-equiv", "")
    summary = index.summary()
    page.goto(path.as_uri())
    page.wait_for_selector("#rows tr")
    assert _match(page) == 512 and len(_concepts(page)) == 200            # the first 200 rows, then more on request
    page.click("#all")
    page.wait_for_function("document.querySelectorAll('#rows tr').length == 512")
    assert sorted(_concepts(page)) == list(range(512)) and page.is_hidden("#more")
    assert "512 of 512 concepts match" in page.inner_text("#count")
    assert page.eval_on_selector_all("#rows tr.drawn", "rows => rows.map(r => +r.dataset.concept)") == [5, 9]

    page.click("th[data-key=freq]")                                        # sorted by frequency, most frequent first
    freq = summary["frequency"]
    assert _concepts(page)[:50] == sorted(range(512), key=lambda i: (-freq[i], i))[:50]
    assert _concepts(page)[:50] != list(range(50))
    page.click("th[data-key=freq]")                                        # and reversed
    assert _concepts(page)[:20] == sorted(range(512), key=lambda i: (freq[i], i))[:20]

    common = max(range(10), key=lambda c: sum(c in cs for cs in summary["classes"]))
    page.select_option("#f-class", str(common))                            # a class filter narrows
    expected = [i for i in range(512) if common in summary["classes"][i]]
    assert _match(page) == len(expected) and 0 < len(expected) < 512
    if page.is_visible("#all"):
        page.click("#all")
    assert sorted(_concepts(page)) == expected
    page.select_option("#f-class", "")
    page.fill("#f-search", "10-19, 300")
    assert _match(page) == 11 and sorted(_concepts(page)) == [*range(10, 20), 300]
    page.fill("#f-search", "")
    page.fill("#f-freq", str(100 * sorted(freq)[256]))
    assert _match(page) == sum(f >= sorted(freq)[256] for f in freq)

    page.evaluate("window.scrollTo(0, 0)")                                # thumbnails with their heat maps
    page.wait_for_function("document.querySelectorAll('canvas[data-drawn]').length >= 5")
    lit = page.evaluate("""() => [...document.querySelectorAll('canvas[data-drawn]')].slice(0, 5).map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s; })""")
    assert lit and all(v > 0 for v in lit), lit
    assert page.outside == [] and page.errors == [], (page.outside, page.errors)


# ----- featinv concepts on the quick demo pair ---------------------------------------------------------

def test_the_command_writes_the_index_into_the_basis_and_the_atlas(quick_demo_out, tmp_path):
    from featinv import cli

    out = tmp_path / "concepts"
    assert cli.main(["concepts", "--demo-out", str(quick_demo_out), "-k", "3", "--method", "nmf", "--draw", "1",
                     "--steps", "2", "--exemplars", "1", "--removals", "1", "--device", "cpu", "--out", str(out)]) == 0
    index = ConceptBasis.load(out / "concepts.safetensors").stats["index"]
    assert set(index) == INDEX_KEYS and index["images"] > 1000              # the demo's training digits
    assert all(len(index[key]) == 3 for key in INDEX_KEYS - {"images"})
    assert all(0 < f <= 1 for f in index["frequency"]) and all(m > 0 for m in index["mean_code"])
    assert all(isinstance(c, int) and 0 <= c < 10 for cs in index["classes"] for c in cs)
    table = json.loads((out / "table.json").read_text())
    assert len(table["rows"]) == 3 and len(table["drawn"]) == 1 and [r["drawn"] for r in table["rows"]].count(True) == 1
    (d,) = table["drawn"]
    exact = [all(v is not None for v in row) for row in table["importance_removal"]]
    assert exact == [i == d for i in range(3)]                              # exact removal: the concept drawn only
    assert table["importance_removal"][d] == pytest.approx(table["importance_gradient"][d], abs=1e-4)  # linear head
    assert [r["removal_top"] is None for r in table["rows"]] == [i != d for i in range(3)]
    assert [r["active_share"] for r in table["rows"]] == pytest.approx(index["frequency"], rel=1e-5)
    full = json.loads((out / "index.json").read_text())
    assert full["images"] == index["images"] and len(full["image_names"]) == index["images"]
    html = (out / "atlas.html").read_text()
    assert '"k":3' in html and "featinv concepts: 3 concepts (nmf)" in html
