"""The concept atlas as one static HTML file over a :class:`~featinv.analysis.concept_index.ConceptIndex`.

One row per concept: its number, frequency, mean code, the classes whose logit falls most on its removal,
that drop (importance) and thumbnails of its top activating images with its heat map over them. The file
holds everything (no network, no external script or style; it opens from disk): each exemplar image once as a
small PNG or JPEG data URI, shared by every concept that uses it, and the heat maps as the concepts' grid codes
(one byte per grid cell, scaled to the concept's largest code), drawn on <canvas> in the browser. The table sorts
by a click on a column header, filters by minimum frequency, class, importance range, concept numbers and drawn
concepts, and renders 200 rows at a time (``show more`` / ``show all``; thumbnails are drawn as they scroll into
view), so thousands of concepts stay fast.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from featinv.analysis.concept_index import ConceptIndex
from featinv.io import atomic_write_text
from featinv.visualize import to_uint8

PAGE = 200        # rows rendered at a time


def _data_uri(image: Tensor, thumb: int) -> str:
    """(3, H, W) in [0, 1] -> a data URI of at most ``thumb`` px a side: PNG or JPEG, whichever is smaller."""
    x = image.detach().float().cpu()[None]
    if max(x.shape[-2:]) > thumb:
        x = F.interpolate(x, size=(thumb, thumb), mode="bilinear", antialias=True)
    picture = Image.fromarray(to_uint8(x[0]))
    encoded = []
    for fmt, mime, kwargs in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 85})):
        buf = io.BytesIO()
        picture.save(buf, format=fmt, **kwargs)
        encoded.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, data = min(encoded)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _shown(index: ConceptIndex, exemplars: int) -> list[list[int]]:
    """Per concept the positions (in its top-T) of the images shown: read (>= 0), active (peak > 0), the first
    ``exemplars``."""
    keep = (index.top_images >= 0) & (index.top_peaks > 0)
    return [[j for j, ok in enumerate(row) if ok][:exemplars] for row in keep.tolist()]


def _heat(index: ConceptIndex, shown: list[list[int]]) -> tuple[str, list[float]]:
    """The shown images' grid codes, one byte per cell scaled to the concept's largest shown code, concatenated in
    concept order -> (base64, vmax per concept)."""
    chunks, vmax = [], []
    for i, positions in enumerate(shown):
        grids = index.top_grids[i, positions].float().clamp(min=0)        # (n, h, w)
        top = float(grids.max()) if len(positions) else 0.0
        vmax.append(float(f"{top:.4g}"))
        if len(positions):
            scaled = (grids / top * 255).round() if top > 0 else torch.zeros_like(grids)
            chunks.append(scaled.clamp(0, 255).to(torch.uint8).flatten())
    data = torch.cat(chunks).numpy().tobytes() if chunks else b""
    return base64.b64encode(data).decode("ascii"), vmax


def atlas_payload(index: ConceptIndex, images: Tensor, names: Sequence[str] | None = None, drawn: Iterable[int] = (),
                  title: str = "", exemplars: int = 5, thumb: int = 48,
                  class_names: Sequence[str] | None = None) -> dict:
    """The data the page reads (JSON values): per concept its numbers, shown images, peaks and heat bytes; the
    images' thumbnails (each once) and names. images: (N, 3, H, W) in [0, 1], the N images the index read, in
    its order."""
    if images.ndim != 4 or images.shape[0] != index.images or images.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: the atlas needs the index's {index.images} images "
                         "as (N, 3, H, W)")
    names = [f"image {n}" for n in range(index.images)] if names is None else list(names)
    if len(names) != index.images:
        raise ValueError(f"{len(names)} image names for an index of {index.images} images")
    drawn = sorted(set(int(i) for i in drawn))
    if any(not 0 <= i < index.k for i in drawn):
        raise ValueError(f"drawn concepts {drawn} out of range: the index has {index.k} concepts")
    shown = _shown(index, exemplars)
    heat, vmax = _heat(index, shown)
    ex = [[int(index.top_images[i, j]) for j in positions] for i, positions in enumerate(shown)]
    peaks = [[float(f"{float(index.top_peaks[i, j]):.4g}") for j in positions] for i, positions in enumerate(shown)]
    used = sorted({n for row in ex for n in row})
    summary = index.summary()
    return {"title": title, "k": index.k, "images": index.images, "grid": list(index.grid), "thumb": thumb,
            "page": PAGE, "freq": summary["frequency"], "mean": summary["mean_code"], "imp": summary["importance"],
            "cls": summary["classes"], "drawn": drawn, "ex": ex, "peak": peaks, "vmax": vmax, "heat": heat,
            "thumbs": {n: _data_uri(images[n], thumb) for n in used}, "names": {n: names[n] for n in used},
            "class_names": None if class_names is None else list(class_names),
            "importance": index.importance is not None}


def atlas_html(payload: dict) -> str:
    """The page for :func:`atlas_payload`'s data: one self-contained HTML document."""
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")  # never ends the script
    title = html.escape(payload["title"] or f"featinv concepts: {payload['k']} concepts")
    return _TEMPLATE.replace("@TITLE@", title).replace("@DATA@", data).replace("@SCRIPT@", _SCRIPT)


def write_atlas_html(path: str | Path, index: ConceptIndex, images: Tensor, names: Sequence[str] | None = None,
                     drawn: Iterable[int] = (), title: str = "", exemplars: int = 5, thumb: int = 48,
                     class_names: Sequence[str] | None = None) -> Path:
    """Write the atlas page of ``index`` (see :func:`atlas_payload`) to ``path``, atomically -> the path."""
    payload = atlas_payload(index, images, names, drawn, title, exemplars, thumb, class_names)
    return atomic_write_text(atlas_html(payload), path)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<style>
body{font:14px system-ui,sans-serif;margin:1em;color:#222}
h1{font-size:1.3em;margin:.2em 0}.legend{color:#555;max-width:70em}
#filters{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:.8em 0}
#filters input[type=number]{width:6em}#f-search{width:10em}.bad{outline:2px solid #c33}
table{border-collapse:collapse}
th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;vertical-align:middle}
th{cursor:pointer;user-select:none;background:#f4f4f4;position:sticky;top:0}th.up::after{content:" \\25B2"}
th.down::after{content:" \\25BC"}td.cls,td.ex{text-align:left}tr.drawn{background:#fff8e0}
canvas{margin:1px;image-rendering:pixelated;background:#eee}#count{font-weight:600}
</style></head><body>
<h1>@TITLE@</h1>
<p class="legend" id="legend"></p>
<div id="filters">
<label>frequency &ge; <input id="f-freq" type="number" min="0" max="100" step="any" placeholder="0"> %</label>
<label>class <select id="f-class"><option value="">any</option></select></label>
<label>importance <input id="f-imp-min" type="number" step="any" placeholder="min"> to
<input id="f-imp-max" type="number" step="any" placeholder="max"></label>
<label>concepts <input id="f-search" type="text" placeholder="e.g. 12, 40-50"></label>
<label><input id="f-drawn" type="checkbox"> drawn only</label>
<span id="count"></span>
</div>
<table id="atlas"><thead><tr>
<th data-key="concept">concept</th><th data-key="freq">frequency</th><th data-key="mean">mean code</th>
<th data-key="cls">top classes</th><th data-key="imp">importance</th><th data-key="ex">top images (heat: code)</th>
</tr></thead><tbody id="rows"></tbody></table>
<p><button id="more">show more</button> <button id="all">show all</button></p>
<script type="application/json" id="data">@DATA@</script>
<script>@SCRIPT@</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const K = D.k, TH = D.thumb, L = D.grid[0] * D.grid[1];
const heat = Uint8Array.from(atob(D.heat), c => c.charCodeAt(0));
const off = new Int32Array(K + 1);
for (let i = 0; i < K; i++) off[i + 1] = off[i] + D.ex[i].length * L;
const drawn = new Set(D.drawn), images = new Map();
const S = {key: "concept", dir: 1, list: [], shown: 0};
const clamp = v => Math.min(1, Math.max(0, v));
const num = v => v === null ? "n/a" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
const pct = v => (100 * v).toFixed(v < 0.001 && v > 0 ? 3 : 1) + " %";
const className = c => D.class_names && D.class_names[c] !== undefined ? c + " " + D.class_names[c] : String(c);
const KEYS = {concept: i => i, freq: i => D.freq[i], mean: i => D.mean[i], imp: i => D.imp[i],
              cls: i => D.cls[i].length ? D.cls[i][0] : Infinity, ex: i => -D.ex[i].length};

function image(n) {
  if (!images.has(n)) images.set(n, new Promise(ok => {
    const im = new Image(); im.onload = () => ok(im); im.onerror = () => ok(null); im.src = D.thumbs[n]; }));
  return images.get(n);
}
function heatCanvas(base) {  // the grid's codes as a small RGBA picture: the "hot" map, alpha 0.6 at the max
  const c = document.createElement("canvas"); c.width = D.grid[1]; c.height = D.grid[0];
  const ctx = c.getContext("2d"), px = ctx.createImageData(c.width, c.height);
  for (let p = 0; p < L; p++) {
    const u = heat[base + p] / 255;
    px.data.set([255 * clamp(3 * u), 255 * clamp(3 * u - 1), 255 * clamp(3 * u - 2), 153 * u], 4 * p);
  }
  ctx.putImageData(px, 0, 0); return c;
}
async function paint(canvas) {
  const i = +canvas.dataset.concept, j = +canvas.dataset.rank, im = await image(D.ex[i][j]);
  const ctx = canvas.getContext("2d"), base = off[i] + j * L;
  if (im) { ctx.imageSmoothingEnabled = im.width >= TH; ctx.drawImage(im, 0, 0, TH, TH); }
  ctx.imageSmoothingEnabled = true; ctx.drawImage(heatCanvas(base), 0, 0, TH, TH);
  let best = 0;
  for (let p = 1; p < L; p++) if (heat[base + p] > heat[base + best]) best = p;
  const cw = TH / D.grid[1], ch = TH / D.grid[0];
  ctx.strokeStyle = "#0cf"; ctx.lineWidth = 1;
  ctx.strokeRect((best % D.grid[1]) * cw + 0.5, Math.floor(best / D.grid[1]) * ch + 0.5, cw - 1, ch - 1);
  canvas.dataset.drawn = "1";
}
const seen = new IntersectionObserver(entries => entries.forEach(e => {
  if (e.isIntersecting) { seen.unobserve(e.target); paint(e.target); } }), {rootMargin: "400px"});

function row(i) {
  const tr = document.createElement("tr"); tr.dataset.concept = i;
  if (drawn.has(i)) { tr.className = "drawn"; tr.title = "drawn: decoded pictures in concepts.png"; }
  const cells = [[i + (drawn.has(i) ? " \u2605" : ""), ""], [pct(D.freq[i]), ""], [num(D.mean[i]), ""],
                 [D.cls[i].map(className).join(", ") || "\u2013", "cls"], [D.importance ? num(D.imp[i]) : "n/a", ""]];
  for (const [text, cls] of cells) {
    const td = document.createElement("td"); td.textContent = text; td.className = cls; tr.appendChild(td);
  }
  const td = document.createElement("td"); td.className = "ex";
  D.ex[i].forEach((n, j) => {
    const c = document.createElement("canvas"); c.width = c.height = TH;
    c.dataset.concept = i; c.dataset.rank = j; c.dataset.image = n;
    c.title = D.names[n] + ": peak code " + num(D.peak[i][j]); td.appendChild(c); seen.observe(c);
  });
  tr.appendChild(td); return tr;
}
function count() {
  const c = $("count"); c.dataset.match = S.list.length; c.dataset.shown = S.shown;
  c.textContent = S.list.length + " of " + K + " concepts match" +
    (S.shown < S.list.length ? " \u00b7 showing " + S.shown : "");
  $("more").hidden = $("all").hidden = S.shown >= S.list.length;
}
function more(n) {
  const frag = document.createDocumentFragment(), end = Math.min(S.list.length, S.shown + n);
  for (let p = S.shown; p < end; p++) frag.appendChild(row(S.list[p]));
  $("rows").appendChild(frag); S.shown = end; count();
}
function ranges(text) {  // "12, 40-50" -> [[12, 12], [40, 50]]; null: every concept; "bad": not a list of numbers
  const out = [];
  for (const t of text.split(/[\s,]+/)) {
    if (!t) continue;
    const m = t.match(/^(\d+)(?:-(\d+))?$/);
    if (!m) return "bad";
    out.push([+m[1], m[2] === undefined ? +m[1] : +m[2]]);
  }
  return out.length ? out : null;
}
function render() {
  const f = KEYS[S.key];
  S.list.sort((a, b) => (f(a) - f(b)) * S.dir || a - b);
  document.querySelectorAll("th").forEach(th =>
    th.className = th.dataset.key !== S.key ? "" : S.dir > 0 ? "up" : "down");
  $("rows").textContent = ""; S.shown = 0; more(D.page);
}
function apply() {
  const minFreq = (parseFloat($("f-freq").value) || 0) / 100, cls = $("f-class").value;
  const lo = parseFloat($("f-imp-min").value), hi = parseFloat($("f-imp-max").value);
  const r = ranges($("f-search").value), only = $("f-drawn").checked;
  $("f-search").classList.toggle("bad", r === "bad");
  S.list = [];
  for (let i = 0; i < K; i++) {
    if (D.freq[i] < minFreq || (cls !== "" && !D.cls[i].includes(+cls))) continue;
    if ((!isNaN(lo) && !(D.imp[i] >= lo)) || (!isNaN(hi) && !(D.imp[i] <= hi))) continue;
    if (Array.isArray(r) && !r.some(([a, b]) => i >= a && i <= b)) continue;
    if (!only || drawn.has(i)) S.list.push(i);
  }
  render();
}
document.querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
  const key = th.dataset.key;
  S.dir = key === S.key ? -S.dir : (key === "concept" || key === "cls" ? 1 : -1); S.key = key; render();
}));
for (const c of [...new Set(D.cls.flat())].sort((a, b) => a - b)) {
  const o = document.createElement("option"); o.value = c; o.textContent = className(c); $("f-class").appendChild(o);
}
for (const id of ["f-freq", "f-class", "f-imp-min", "f-imp-max", "f-search", "f-drawn"])
  $(id).addEventListener("input", apply);
$("more").addEventListener("click", () => more(D.page));
$("all").addEventListener("click", () => more(S.list.length));
$("legend").textContent = K + " concepts indexed on " + D.images + " images (a " + D.grid[0] + "\u00d7" + D.grid[1] +
  " grid). Frequency: share of the locations where the concept's code is non-zero; mean code: its mean there; " +
  "top classes: the classes whose logit falls most when it is removed (first-order estimate, gradient \u00d7 code, " +
  "mean over the class's images); importance: the largest of those drops. Thumbnails: the images where its code " +
  "peaks highest, heat = its code (scaled to the concept's largest), the box its peak location." +
  (drawn.size ? " \u2605 drawn: decoded pictures in concepts.png." : "") + " Click a column header to sort.";
apply();
"""
