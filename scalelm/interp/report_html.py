"""The HTML report of ``scalelm inspect``: one self-contained file (no network, no other files).

Three parts: the text coloured by surprisal (hover a token: its loss and the model's top guesses for
it); each layer's attention (pick a layer and a head, or their mean; hover a token to tint the tokens
it attends to, and see the whole pattern as a heatmap); the logit lens as a table. The data sits in
the page as JSON; attention weights as bytes (weight x 255) in base64, which keeps a 12-layer,
12-head report of 256 tokens near 13 MB. Past :data:`MAX_CELLS` weights only the mean over heads is
kept, and past that none (the page says so).
"""

from __future__ import annotations

import base64
import html
import json

import torch

from .inspect import Inspection

MAX_CELLS = 1 << 23  # attention weights kept per head (8M bytes); above, per layer the mean of the heads


def _attention_payload(att: torch.Tensor) -> dict:
    L, H, T, _ = att.shape
    note = ""
    if L * H * T * T > MAX_CELLS:
        att, note = att.mean(dim=1, keepdim=True), "per-head attention left out (too large): the mean of the heads"
        if L * T * T > MAX_CELLS:
            return {"layers": L, "heads": 0, "T": T, "data": "", "note": "attention left out: too long a text"}
    q = att.clamp(0, 1).mul(255).round().to(torch.uint8).contiguous().numpy().tobytes()
    return {"layers": L, "heads": att.shape[1], "T": T, "data": base64.b64encode(q).decode("ascii"), "note": note}


def render_report(ins: Inspection, title: str = "scalelm inspect") -> str:
    """The report as one HTML string."""
    data = {
        "pieces": ins.pieces, "bits": [None if s is None else round(s, 4) for s in ins.surprisal],
        "top": [[[t, round(p, 4)] for _, t, p in row] for row in ins.top],
        "lens_labels": ins.lens_labels,
        "lens": [[[[t, round(p, 4)] for _, t, p in cell] for cell in row] for row in ins.lens_top],
        "attention": _attention_payload(ins.attention), "meta": ins.meta,
    }
    mean = ins.mean_loss
    summary = (f"{len(ins.ids)} tokens" + (f", mean loss {mean:.3f} nats ({mean / 0.6931471805599453:.2f} bits per "
                                           f"token)" if mean is not None else ""))
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__SUMMARY__", html.escape(summary))
            .replace("__DATA__", blob))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
.text{font:15px/2 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;border:1px solid #eee;padding:10px}
.tok{border-radius:3px;padding:1px 0;cursor:default}.tok:hover{outline:1px solid #333}
.legend{display:flex;gap:4px;align-items:center;font-size:12px;margin:6px 0}
.legend span{display:inline-block;width:28px;height:12px}
#tip{position:fixed;display:none;background:#fff;border:1px solid #999;padding:6px 8px;font:12px monospace;
 box-shadow:0 2px 6px #0003;pointer-events:none;max-width:420px;white-space:pre}
table.lens{border-collapse:collapse;font:12px ui-monospace,monospace}
table.lens td,table.lens th{border:1px solid #e4e4e4;padding:2px 5px;white-space:pre;max-width:110px;overflow:hidden}
canvas{image-rendering:pixelated;border:1px solid #ccc;margin-top:8px}
.note{color:#a33;font-size:12px}
</style></head><body>
<h1>__TITLE__</h1><p>__SUMMARY__</p>
<h2>Surprisal</h2>
<p>Each token coloured by its surprisal, -log2 p(token | the tokens before it). Hover for the model's top guesses.</p>
<div class="legend" id="legend"></div>
<div class="text" id="surprisal"></div>
<h2>Attention</h2>
<p>Layer <select id="layer"></select> head <select id="head"></select>.
Hover a token: the others are tinted by how much it attends to them. Below: the pattern (row = query, column = key).</p>
<p class="note" id="attnote"></p>
<div class="text" id="attext"></div>
<canvas id="heat"></canvas>
<h2>Logit lens</h2>
<p>The token each position's residual stream decodes to (final norm and LM head applied) after each layer;
shade = its probability. Hover for the top 3.</p>
<div style="overflow-x:auto"><table class="lens" id="lens"></table></div>
<div id="tip"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const tip = document.getElementById("tip");
const esc = s => JSON.stringify(s).slice(1, -1);
function showTip(e, text) { tip.textContent = text; tip.style.display = "block";
  tip.style.left = Math.min(e.clientX + 12, innerWidth - 430) + "px"; tip.style.top = (e.clientY + 14) + "px"; }
function hideTip() { tip.style.display = "none"; }
const maxBits = Math.max(1, ...D.bits.filter(b => b !== null));
const heat = v => `rgba(220,40,30,${Math.min(1, v).toFixed(3)})`;
function tokens(el, style, hover) {
  D.pieces.forEach((p, i) => { const s = document.createElement("span"); s.className = "tok"; s.textContent = p;
    s.dataset.i = i; style(s, i); s.onmousemove = e => hover(e, i, true); s.onmouseleave = e => hover(e, i, false);
    el.appendChild(s); });
}
// surprisal
for (let k = 0; k <= 4; k++) { const b = document.createElement("span"); b.style.background = heat(k / 4);
  b.title = (maxBits * k / 4).toFixed(1) + " bits"; document.getElementById("legend").appendChild(b); }
document.getElementById("legend").append(" 0 to " + maxBits.toFixed(1) + " bits");
tokens(document.getElementById("surprisal"), (s, i) => { if (D.bits[i] !== null) s.style.background = heat(D.bits[i] / maxBits); },
  (e, i, on) => { if (!on) return hideTip();
    const b = D.bits[i] === null ? "first token: not predicted" : D.bits[i].toFixed(2) + " bits";
    const guess = i > 0 ? D.top[i - 1].map(([t, p]) => `  "${esc(t)}" ${p.toFixed(3)}`).join("\\n") : "";
    showTip(e, `"${esc(D.pieces[i])}" (position ${i}): ${b}` + (guess ? "\\nthe model's top guesses here:\\n" + guess : "")); });
// attention
const A = D.attention, T = A.T;
const bytes = A.data ? Uint8Array.from(atob(A.data), c => c.charCodeAt(0)) : null;
document.getElementById("attnote").textContent = A.note || "";
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
for (let l = 0; l < A.layers; l++) layerSel.add(new Option(String(l), l));
if (A.heads > 1) headSel.add(new Option("mean", -1));
for (let h = 0; h < A.heads; h++) headSel.add(new Option(A.heads > 1 ? String(h) : "mean", h));
function weight(l, h, q, k) {
  if (!bytes) return 0;
  if (h >= 0) return bytes[((l * A.heads + h) * T + q) * T + k] / 255;
  let s = 0; for (let j = 0; j < A.heads; j++) s += bytes[((l * A.heads + j) * T + q) * T + k]; return s / A.heads / 255;
}
const attext = document.getElementById("attext");
tokens(attext, () => {}, (e, q, on) => {
  const l = +layerSel.value, h = +headSel.value;
  attext.querySelectorAll(".tok").forEach(s => { const k = +s.dataset.i;
    s.style.background = on ? `rgba(30,90,220,${weight(l, h, q, k).toFixed(3)})` : ""; });
  if (on) { const top = [...Array(T).keys()].map(k => [weight(l, h, q, k), k]).sort((a, b) => b[0] - a[0]).slice(0, 5);
    showTip(e, `"${esc(D.pieces[q])}" attends to:\\n` + top.map(([w, k]) => `  "${esc(D.pieces[k])}" ${w.toFixed(3)}`).join("\\n")); }
  else hideTip(); });
function drawHeat() {
  const c = document.getElementById("heat"), px = Math.max(2, Math.min(28, Math.floor(560 / Math.max(T, 1))));
  c.width = c.height = T * px; const g = c.getContext("2d"); const l = +layerSel.value, h = +headSel.value;
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const w = weight(l, h, q, k); g.fillStyle = `rgb(${255 - 225 * w | 0},${255 - 165 * w | 0},${255 - 35 * w | 0})`;
    g.fillRect(k * px, q * px, px, px); }
}
layerSel.onchange = headSel.onchange = drawHeat; drawHeat();
// logit lens
const lens = document.getElementById("lens");
const head = lens.insertRow(); ["pos", "token", ...D.lens_labels].forEach(t => { const th = document.createElement("th"); th.textContent = t; head.appendChild(th); });
D.pieces.forEach((p, i) => { const r = lens.insertRow(); r.insertCell().textContent = i; r.insertCell().textContent = `"${esc(p)}"`;
  D.lens.forEach((row, l) => { const [t, pr] = row[i][0]; const td = r.insertCell(); td.textContent = esc(t);
    td.style.background = `rgba(40,150,60,${pr.toFixed(3)})`;
    td.onmousemove = e => showTip(e, `${D.lens_labels[l]}, position ${i}:\\n` + row[i].map(([a, b]) => `  "${esc(a)}" ${b.toFixed(3)}`).join("\\n"));
    td.onmouseleave = hideTip; }); });
</script></body></html>
"""
