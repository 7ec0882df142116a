"""The error browser: one HTML page (results/browser.html) with a row per test utterance, and sliders that re-fuse.

Each row: the audio, the picture (one thumbnail per picture, shared by its rows), speaker and group, the reference,
Whisper's top hypothesis and the fused choice with word differences marked (a small word-level LCS diff in the
page), and the n-best list with every score the fusion uses. The sliders move the picture weight (λ_clip of the
log-linear form, α of the seed form), the length bonus β (log-linear) and the LM weight (when the LM term is on),
and re-fuse every utterance from the stored scores with exactly ``fuse``'s arithmetic
(:mod:`mmasr.rescoring.fusion`):

- log-linear: ``sum_logprob + λ_clip·(τ·cos) + λ_lm·lm_logprob + β·n_tokens``, evaluated left to right in float64
  over the same :func:`~mmasr.rescoring.fusion.filled` terms ``fuse`` weights;
- seed: ``(1 - w_clip - w_lm)·p_asr + w_clip·p_clip + w_lm·p_lm`` with the masked softmaxes p_* computed here by
  :func:`~mmasr.rescoring.fusion.masked_softmax` and stored (w_clip = α; w_lm = 0 is ``fuse``'s α grid term for term);

ties go to the better Whisper rank (the first maximum), as :func:`~mmasr.rescoring.fusion.choose`. Every
hypothesis's word errors are counted here with ``fuse``'s normaliser (:func:`~mmasr.rescoring.fusion.to_arrays`),
so the page only sums errors over reference words for the pooled WER. Floats travel as shortest round-trip
decimal strings (Python's ``repr``), which JavaScript parses to the same doubles.

The audio is embedded (16 kHz FLAC, base64) when the test set's audio is small (``report.browser_embed_audio_mb``,
counted as 16-bit PCM, an upper bound of the FLAC size); above it every player links the processed file by a path
relative to the page, so the page then needs ``data/processed/audio`` beside ``results/`` (as in the project
folder), and says so at its top. Rows are rendered a page at a time (``report.browser_page_rows``), so a test set
of thousands of utterances stays usable.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from mmasr.data.text import normaliser
from mmasr.rescoring.fusion import alpha_grid, filled, fixed_alpha_choice, lambda_grid, masked_softmax, to_arrays
from mmasr.report.build import thumbnail_png

PCM_BYTES_PER_S = 16000 * 2  # 16 kHz, 16-bit mono: the processed audio's size, an upper bound of its FLAC


def _num(x: float) -> float | None:
    """A float for the page's JSON: None when not finite."""
    x = float(x)
    return x if np.isfinite(x) else None


def flac_data_uri(path: Path) -> str:
    """A processed utterance as a base64 FLAC ``data:`` URI (lossless, about half of 16-bit PCM)."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="int16", always_2d=False)
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="FLAC", subtype="PCM_16")
    return "data:audio/flac;base64," + base64.b64encode(buf.getvalue()).decode()


def audio_mode(durations_s: np.ndarray, embed_mb: float) -> str:
    """``embed`` when the audio, counted as 16-bit 16 kHz PCM, fits in ``embed_mb`` MB, else ``link``."""
    total = float(np.nansum(np.asarray(durations_s, np.float64))) * PCM_BYTES_PER_S
    return "embed" if total <= embed_mb * 1e6 else "link"


def relative_href(path: Path, page_dir: Path) -> str:
    """A URL to ``path`` relative to the page's folder."""
    rel = os.path.relpath(Path(path).resolve(), Path(page_dir).resolve())
    return quote(rel.replace(os.sep, "/"))


def dev_weights(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The dev-chosen weights of each form's systems, from fusion.json."""
    out = {"alpha": metrics.get("best_alpha")}
    for form in ("log_linear", "seed"):
        for system in ("fused", "asr_clip_lm"):
            out[f"{system}_{form}"] = metrics.get(f"weights_{system}_{form}_form")
    return out


def browser_data(nbest: pd.DataFrame, manifest: pd.DataFrame, images: pd.DataFrame | None, metrics: Mapping[str, Any],
                 params: Mapping[str, Any], page_dir: Path, root: Path) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (the test split only)."""
    fcfg, text_cfg, rcfg = params["fusion"], params["text"], params.get("report", {})
    meta = manifest.set_index("utt_id")
    ids = meta.index[meta["split"] == "test"]
    part = nbest[nbest["utt_id"].isin(ids)]
    if part.empty:
        raise ValueError("browser: no n-best hypotheses for the test split")
    nb = to_arrays(part, meta["text"], text_cfg)
    tau = float(fcfg["tau"])
    valid = nb.valid
    has_clip, has_lm = valid & np.isfinite(nb.clip), valid & np.isfinite(nb.lm)
    # The seed form's stored terms (fuse / fuse_simplex compute these exact arrays).
    p_asr = masked_softmax(nb.asr, valid)
    p_clip = masked_softmax(tau * np.nan_to_num(nb.clip, nan=0.0), has_clip)
    p_lm = masked_softmax(np.nan_to_num(nb.lm, nan=0.0), has_lm)
    # The log-linear form's terms (log_linear_scores weights these exact arrays).
    ll_ok = metrics.get("weights_fused_log_linear_form") is not None
    clip_term = tau * filled(nb.clip, valid)
    lm_term = filled(nb.lm_total, valid)
    with_lm_ll = ll_ok and bool(np.isfinite(np.where(valid, nb.lm_total, np.nan)).any())
    alphas = alpha_grid(fcfg)
    # the seed form's LM slider walks the simplex on the α grid, which needs the grid to start at 0 (w_lm = 0)
    with_lm_seed = bool(has_lm.any()) and float(alphas[0]) == 0.0
    whisper = fixed_alpha_choice(nb, 0.0, tau)  # fuse's ASR-only pick: Whisper's first hypothesis

    test_meta = meta.loc[nb.utt_ids]
    speakers = sorted(test_meta["speaker"].astype(str).unique())
    groups = sorted(test_meta["group"].astype(str).unique())
    # One thumbnail per picture, referenced by index from the rows.
    img_paths: dict[str, Path] = {}
    if images is not None and {"image_id", "path"} <= set(images.columns):
        for iid, p in zip(images["image_id"], images["path"]):
            p = Path(p)
            img_paths[str(iid)] = p if p.is_absolute() else root / p
    pics, pic_index = [], {}
    px = int(rcfg.get("thumbnail_px", 96))
    mode = audio_mode(test_meta["duration_s"].to_numpy(float) if "duration_s" in test_meta else np.zeros(0),
                      float(rcfg.get("browser_embed_audio_mb", 8)))
    norm = normaliser(text_cfg)  # fuse's: the errors are counted between these texts
    utts = []
    for u, utt_id in enumerate(nb.utt_ids):
        row = test_meta.iloc[u]
        iid = row.get("image_id")
        pic = -1
        if iid is not None and not (isinstance(iid, float) and np.isnan(iid)):
            iid = str(iid)
            if iid not in pic_index:
                path = img_paths.get(iid, root / "data/processed/images" / f"{iid}.png")
                png = thumbnail_png(path, px) if path.is_file() else None
                pic_index[iid] = len(pics) if png is not None else -1
                if png is not None:
                    pics.append("data:image/png;base64," + base64.b64encode(png).decode())
            pic = pic_index[iid]
        audio = Path(str(row["audio_path"]))
        audio = audio if audio.is_absolute() else root / audio
        src = None
        if audio.is_file():
            src = flac_data_uri(audio) if mode == "embed" else relative_href(audio, page_dir)
        hyps = []
        for h in np.flatnonzero(valid[u]):
            hyps.append([str(nb.texts[u, h]), int(nb.errors[u, h]), _num(nb.asr[u, h]), _num(nb.total[u, h]),
                         _num(nb.length[u, h]), _num(nb.clip[u, h]), _num(nb.lm_total[u, h]), _num(nb.lm[u, h]),
                         float(clip_term[u, h]), float(lm_term[u, h]),
                         float(p_asr[u, h]), float(p_clip[u, h]), float(p_lm[u, h])])
        utts.append({"id": str(utt_id), "s": speakers.index(str(row["speaker"])), "g": groups.index(str(row["group"])),
                     "p": pic, "a": src, "r": " ".join(str(meta.at[utt_id, "text"]).split()),
                     "rn": norm(str(meta.at[utt_id, "text"])), "w": int(nb.ref_words[u]),
                     "t": int(whisper[u]), "c": bool(has_clip[u].any()), "l": bool(has_lm[u].any()), "h": hyps})
    keys = ("test_wer_asr", "test_wer_fused", "test_wer_alpha1", "test_wer_oracle", "test_wer_fused_seed_form",
            "test_wer_fused_log_linear_form", "test_wer_asr_clip_lm", "fusion_form", "test_ref_words")
    return {
        "form": metrics.get("fusion_form", "seed"), "tau": tau, "ll": ll_ok,
        "lambdas": [float(x) for x in lambda_grid(fcfg)], "betas": sorted(float(b) for b in fcfg["beta_grid"]),
        "alphas": [float(x) for x in alphas],
        "lm_ll": with_lm_ll, "lm_seed": with_lm_seed, "dev": dev_weights(metrics),
        "metrics": {k: metrics.get(k) for k in keys}, "speakers": speakers, "groups": groups, "pics": pics,
        "audio": mode, "page_rows": int(rcfg.get("browser_page_rows", 100)), "utts": utts,
    }


def render_browser(data: Mapping[str, Any], title: str = "mmasr error browser") -> str:
    """The page: the data as JSON in a script tag, the style and the script inline; nothing fetched."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    need = ("" if data["audio"] == "embed" else
            '<p class="need">The audio is linked, not embedded (the test set\'s audio is above '
            "report.browser_embed_audio_mb): the players need <code>data/processed/audio/</code> beside "
            "<code>results/</code>, as in the project folder. Copy both to listen elsewhere.</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<header><h1>{html.escape(title)}</h1>"
            f'<p>Test utterances, re-fused live from the stored scores with fuse\'s formulas. '
            f'<a href="report.html">Back to the report</a>.</p>{need}</header>\n{BODY}\n'
            f'<script type="application/json" id="data">{payload}</script>\n<script>{SCRIPT}</script>\n</body></html>\n')


def build_browser(nbest: pd.DataFrame, manifest: pd.DataFrame, images: pd.DataFrame | None,
                  metrics: Mapping[str, Any], params: Mapping[str, Any], out: Path, root: Path) -> str:
    """The page's HTML for ``out`` (links are relative to its folder; relative paths in the tables to ``root``)."""
    return render_browser(browser_data(nbest, manifest, images, metrics, params, Path(out).parent, Path(root)))


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:10px 24px}header h1{margin:0;font-size:22px}header a{color:#cfe0ff}
header p{margin:4px 0;font-size:13px}.need{background:#fff6e0;color:#6b4a00;padding:4px 8px;border-radius:4px}
#controls{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #dde2ea;padding:8px 24px;
display:flex;flex-wrap:wrap;gap:8px 22px;align-items:center;font-size:13px}
#controls label{display:flex;gap:6px;align-items:center}#controls input[type=range]{width:220px}
.wer{font-size:20px;font-weight:600;color:#1f3a5f}.dim{color:#6b7686;font-size:12px}.dev{color:#0a7d32;font-weight:600}
main{padding:6px 24px 30px}table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #d5dbe4;padding:4px 6px;text-align:left;vertical-align:top}th{background:#eef1f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}img.thumb{border-radius:4px;border:1px solid #ccd;max-width:96px}
mark{background:#ffe08a;padding:0 2px;border-radius:2px}del{color:#b23}table.nb{font-size:11px;width:auto;margin-top:4px}
table.nb td,table.nb th{padding:1px 4px}tr.pick td{background:#e4f4e8}audio{width:190px;height:32px}
details summary{cursor:pointer;color:#33445c}#pager{margin:8px 0;display:flex;gap:10px;align-items:center}
"""

BODY = """<div id="controls">
<label>form <select id="form"></select></label>
<label><span id="clipname">λ_clip</span> <input id="clip" type="range" min="0" step="1"> <span id="clipval"></span></label>
<label id="betabox">β <input id="beta" type="range" min="0" step="1"> <span id="betaval"></span></label>
<label id="lmbox"><span id="lmname">λ_lm</span> <input id="lm" type="range" min="0" step="1"> <span id="lmval"></span></label>
<button id="devbtn" type="button">dev-chosen weights</button>
<span>test WER <span class="wer" id="wer"></span> <span class="dim" id="refs"></span></span>
<label>group <select id="group"><option value="">all</option></select></label>
<label>speaker <select id="speaker"><option value="">all</option></select></label>
<label><input id="changed" type="checkbox"> only changed</label>
<label><input id="errors" type="checkbox"> only errors</label>
<label>sort <select id="sort"><option value="id">utterance</option><option value="err">errors of the choice</option>
<option value="gain">gain over Whisper</option><option value="loss">loss against Whisper</option>
<option value="speaker">speaker</option></select></label>
</div>
<main><div id="pager"></div>
<table id="rows"><thead><tr><th>audio</th><th>picture</th><th>utterance</th><th>reference · Whisper's top · fused choice</th>
<th>n-best (scores the fusion uses)</th></tr></thead><tbody></tbody></table></main>"""

SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const U = D.utts, TAU = D.tau;
// hypothesis fields: 0 text, 1 errors, 2 asr_score, 3 sum_logprob, 4 n_tokens, 5 clip_cos, 6 lm_logprob, 7 lm_score,
// 8 tau*cos as fuse weights it (filled), 9 lm_logprob as fuse weights it (filled), 10 p_asr, 11 p_clip, 12 p_lm
const S = {form: D.ll ? D.form : "seed", ci: 0, bi: 0, li: 0, page: 0};
let choice = new Int32Array(U.length), score = [];
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (x, d) => x === null || x === undefined ? "–" : Number(x).toFixed(d);
function nearest(grid, v) { let b = 0; for (let i = 1; i < grid.length; i++) if (Math.abs(grid[i] - v) < Math.abs(grid[b] - v)) b = i; return b; }
function clipGrid() { return S.form === "seed" ? D.alphas : D.lambdas; }
function lmOn() { return S.form === "seed" ? D.lm_seed : D.lm_ll; }
function weights() {
  const c = clipGrid()[S.ci];
  if (S.form === "seed") return {c: c, l: lmOn() ? D.alphas[S.li] : 0};
  return {c: c, l: lmOn() ? D.lambdas[S.li] : 0, b: D.betas[S.bi]};
}
// fuse's formulas, term for term (see mmasr.report.browser); ties to the first (best Whisper rank).
function fuseOne(u, w) {
  const hs = u.h, out = new Array(hs.length);
  let best = 0;
  for (let j = 0; j < hs.length; j++) {
    const h = hs[j];
    let s;
    if (S.form === "seed") {
      const wc = u.c ? w.c : 0, wl = u.l ? w.l : 0;
      s = (1 - wc - wl) * h[10] + wc * h[11] + wl * h[12];
    } else {
      s = h[3] + w.c * h[8] + w.l * h[9] + w.b * h[4];
    }
    out[j] = s;
    if (s > out[best]) best = j;
  }
  return [best, out];
}
function refuse() {
  const w = weights();
  let err = 0, words = 0;
  score = new Array(U.length);
  for (let i = 0; i < U.length; i++) {
    const [b, s] = fuseOne(U[i], w);
    choice[i] = b; score[i] = s; err += U[i].h[b][1]; words += U[i].w;
  }
  const wer = err / Math.max(1, words);
  const el = $("wer");
  el.textContent = wer.toFixed(3); el.dataset.wer = String(wer); el.dataset.errors = String(err);
  document.body.dataset.choices = Array.from(choice).join(",");
}
function isDev() {
  const w = weights(), d = D.dev;
  if (S.form === "seed") return w.c === d.alpha && w.l === 0;
  const f = d.fused_log_linear; return !!f && w.c === f.lambda_clip && w.l === 0 && w.b === f.beta;
}
function label(grid, i, devv) { const v = grid[i]; return (v === devv ? '<span class="dev">' + v + " ★ dev</span>" : String(v)); }
function syncLabels() {
  const d = D.dev, seed = S.form === "seed", f = d.fused_log_linear || {};
  $("clipname").textContent = seed ? "α (picture weight)" : "λ_clip"; $("lmname").textContent = seed ? "w_lm" : "λ_lm";
  $("clipval").innerHTML = label(clipGrid(), S.ci, seed ? d.alpha : f.lambda_clip);
  $("betabox").style.display = seed ? "none" : ""; $("betaval").innerHTML = label(D.betas, S.bi, f.beta);
  $("lmbox").style.display = lmOn() ? "" : "none";
  const lg = seed ? D.alphas : D.lambdas; $("lmval").innerHTML = label(lg, S.li, 0);
  document.body.dataset.form = S.form; document.body.dataset.clip = String(clipGrid()[S.ci]);
  document.body.dataset.dev = isDev() ? "1" : "0";
}
function setRanges() {
  $("clip").max = clipGrid().length - 1; $("clip").value = S.ci;
  $("beta").max = D.betas.length - 1; $("beta").value = S.bi;
  // seed form: w_clip + w_lm <= 1 on the alpha grid (the simplex of fuse_simplex)
  const lmMax = S.form === "seed" ? Math.max(0, D.alphas.length - 1 - S.ci) : D.lambdas.length - 1;
  if (S.li > lmMax) S.li = lmMax;
  $("lm").max = lmMax; $("lm").value = S.li;
}
function toDev() {
  const d = D.dev;
  if (S.form === "seed") { S.ci = nearest(D.alphas, d.alpha || 0); }
  else { const f = d.fused_log_linear; S.ci = nearest(D.lambdas, f.lambda_clip); S.bi = nearest(D.betas, f.beta); }
  S.li = 0;
}
function diff(ref, hyp) {
  const r = ref ? ref.split(" ") : [], h = hyp ? hyp.split(" ") : [], n = r.length, m = h.length;
  const L = Array.from({length: n + 1}, () => new Int32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    L[i][j] = r[i] === h[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = []; let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && r[i] === h[j]) { out.push(esc(h[j])); i++; j++; }
    else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) { out.push("<mark>" + esc(h[j]) + "</mark>"); j++; }
    else { out.push("<del>" + esc(r[i]) + "</del>"); i++; }
  }
  return out.join(" ") || "<em>(empty)</em>";
}
function visible() {
  const g = $("group").value, sp = $("speaker").value, ch = $("changed").checked, er = $("errors").checked;
  const idx = [];
  for (let i = 0; i < U.length; i++) {
    const u = U[i];
    if (g !== "" && D.groups[u.g] !== g) continue;
    if (sp !== "" && D.speakers[u.s] !== sp) continue;
    if (ch && choice[i] === U[i].t) continue;
    if (er && u.h[choice[i]][1] === 0) continue;
    idx.push(i);
  }
  const key = $("sort").value, e = i => U[i].h[choice[i]][1], gain = i => U[i].h[U[i].t][1] - e(i);
  const by = {id: (a, b) => (U[a].id < U[b].id ? -1 : U[a].id > U[b].id ? 1 : 0),
    err: (a, b) => e(b) - e(a) || a - b, gain: (a, b) => gain(b) - gain(a) || a - b,
    loss: (a, b) => gain(a) - gain(b) || a - b,
    speaker: (a, b) => (D.speakers[U[a].s] < D.speakers[U[b].s] ? -1 : D.speakers[U[a].s] > D.speakers[U[b].s] ? 1 : a - b)}[key];
  idx.sort(by);
  return idx;
}
function nbestTable(i) {
  const u = U[i], seed = S.form === "seed";
  let t = '<table class="nb"><tr><th>#</th><th>hypothesis (normalised)</th><th>err</th><th>asr_score</th><th>sum_logprob</th>' +
    "<th>n_tokens</th><th>CLIP cos</th>" + (lmOn() ? "<th>" + (seed ? "lm_score" : "lm_logprob") + "</th>" : "") +
    "<th>fused " + (seed ? "prob." : "score") + "</th></tr>";
  u.h.forEach((h, j) => {
    t += '<tr class="' + (j === choice[i] ? "pick" : "") + '"><td>' + j + "</td><td>" + esc(h[0]) + '</td><td class="num">' + h[1] +
      '</td><td class="num">' + fmt(h[2], 3) + '</td><td class="num">' + fmt(h[3], 2) + '</td><td class="num">' + fmt(h[4], 0) +
      '</td><td class="num">' + fmt(h[5], 4) + "</td>" + (lmOn() ? '<td class="num">' + fmt(seed ? h[7] : h[6], 3) + "</td>" : "") +
      '<td class="num">' + fmt(score[i][j], seed ? 4 : 2) + "</td></tr>";
  });
  return t + "</table>";
}
function render() {
  const idx = visible(), per = D.page_rows, pages = Math.max(1, Math.ceil(idx.length / per));
  if (S.page >= pages) S.page = pages - 1;
  const rows = idx.slice(S.page * per, (S.page + 1) * per).map(i => {
    const u = U[i], c = choice[i], top = u.h[u.t], pick = u.h[c];
    const audio = u.a ? '<audio controls preload="none" src="' + esc(u.a) + '"></audio>' : '<span class="dim">no audio file</span>';
    const pic = u.p >= 0 ? '<img class="thumb" alt="picture" src="' + D.pics[u.p] + '">' : '<span class="dim">no picture</span>';
    return '<tr class="utt" data-utt="' + esc(u.id) + '" data-group="' + esc(D.groups[u.g]) + '" data-speaker="' +
      esc(D.speakers[u.s]) + '" data-choice="' + c + '" data-errors="' + pick[1] + '"><td>' + audio + "</td><td>" + pic +
      "</td><td>" + esc(u.id) + '<br><span class="dim">' + esc(D.speakers[u.s]) + " · " + esc(D.groups[u.g]) + " · " +
      u.w + " words</span></td><td><div>" + esc(u.r) + '</div><div><span class="dim">Whisper, #' + u.t + " (" + top[1] + " err):</span> " +
      diff(u.rn, top[0]) + '</div><div><span class="dim">fused, #' + c + " (" + pick[1] + " err):</span> " + diff(u.rn, pick[0]) +
      "</div></td><td><details" + (c !== u.t ? " open" : "") + "><summary>" + u.h.length + " hypotheses</summary>" +
      nbestTable(i) + "</details></td></tr>";
  });
  document.querySelector("#rows tbody").innerHTML = rows.join("");
  $("pager").innerHTML = '<button type="button" id="prev">◀</button> page ' + (S.page + 1) + " of " + pages + ' <button type="button" id="next">▶</button> ' +
    '<span id="count" data-rows="' + idx.length + '" data-shown="' + rows.length + '">' + idx.length + " of " + U.length +
    " utterances (" + per + " a page)</span>";
  $("prev").onclick = () => { if (S.page > 0) { S.page--; render(); } };
  $("next").onclick = () => { if (S.page < pages - 1) { S.page++; render(); } };
}
function update() { syncLabels(); refuse(); render(); }
function init() {
  const m = D.metrics;
  $("refs").textContent = "(Whisper alone " + fmt(m.test_wer_asr, 3) + ", fuse's headline " + fmt(m.test_wer_fused, 3) +
    ", picture alone α = 1 " + fmt(m.test_wer_alpha1, 3) + ", oracle " + fmt(m.test_wer_oracle, 3) + ")";
  for (const f of (D.ll ? ["log_linear", "seed"] : ["seed"])) $("form").add(new Option(f === D.form ? f + " (headline)" : f, f));
  D.groups.forEach(g => $("group").add(new Option(g, g)));
  D.speakers.forEach(s => $("speaker").add(new Option(s, s)));
  const q = new URLSearchParams(location.search);
  if (q.get("form") && (q.get("form") === "seed" || D.ll)) S.form = q.get("form");
  $("form").value = S.form;
  toDev();
  const pick = (name, grid) => { const v = q.get(name); if (v === null) return null;
    if (v === "max") return grid.length - 1; if (v === "min") return 0; return nearest(grid, parseFloat(v)); };
  const c = pick("clip", clipGrid()); if (c !== null) S.ci = c;
  const b = pick("beta", D.betas); if (b !== null) S.bi = b;
  const l = pick("lm", S.form === "seed" ? D.alphas : D.lambdas); if (l !== null) S.li = l;
  for (const k of ["group", "speaker", "sort"]) if (q.get(k) !== null) $(k).value = q.get(k);
  for (const k of ["changed", "errors"]) $(k).checked = q.get(k) === "1";
  if (q.get("page")) S.page = Math.max(0, parseInt(q.get("page"), 10) - 1);
  setRanges();
  $("form").onchange = () => { S.form = $("form").value; toDev(); setRanges(); update(); };
  $("clip").oninput = () => { S.ci = +$("clip").value; setRanges(); update(); };
  $("beta").oninput = () => { S.bi = +$("beta").value; update(); };
  $("lm").oninput = () => { S.li = +$("lm").value; update(); };
  $("devbtn").onclick = () => { toDev(); setRanges(); update(); };
  for (const k of ["group", "speaker", "sort", "changed", "errors"]) $(k).onchange = () => { S.page = 0; render(); };
  update();
  // ?move=clip:0,beta:max drags the sliders after load, through their own input handlers (as a user would).
  for (const item of (q.get("move") || "").split(",").filter(Boolean)) {
    const [name, v] = item.split(":"), el = $(name);
    const grid = name === "beta" ? D.betas : name === "clip" ? clipGrid() : (S.form === "seed" ? D.alphas : D.lambdas);
    el.value = v === "max" ? el.max : v === "min" ? 0 : nearest(grid, parseFloat(v));
    el.dispatchEvent(new Event("input"));
  }
  document.body.dataset.ready = "1";
}
init();
"""
