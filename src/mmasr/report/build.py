"""One self-contained HTML report of a pipeline run: data, rescoring, projector, CLAP, probe, provenance.

The report is one file a researcher can send to a colleague: plots are matplotlib PNGs and pictures
small PNG thumbnails, both embedded as base64 ``data:`` URIs; the style sheet is inline; nothing is
fetched when it is opened. Every text from the data is HTML-escaped.

Layout: ``load_inputs`` reads whatever exists (a missing or unreadable file becomes a ``Missing``
marker), one small function per section turns tables and dicts into HTML, and ``render_report``
puts them together. A section whose stage has not run says so ("not run yet (missing <path>)")
instead of failing, and a missing optional file or column only drops that part of its section.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import html
import io
import json
import logging
import math
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmasr.metrics.intervals import few_speakers_warning
from mmasr.metrics.verdict import picture_verdict

log = logging.getLogger("mmasr")

# Where each input lies, relative to the project root (the pipeline's layout). Override any with
# `mmasr report --input NAME=PATH`.
DEFAULT_INPUTS: dict[str, str] = {
    "manifest": "data/processed/manifest.parquet",
    "rejects": "data/processed/rejects.parquet",
    "images": "data/processed/images.parquet",
    "images_dir": "data/processed/images",
    "preprocess_metrics": "results/metrics/preprocess.json",
    "split_metrics": "results/metrics/split.json",
    "split_excluded": "results/split/excluded.parquet",
    "nbest": "data/nbest/nbest.parquet",
    "embeddings": "data/cache/clip_image_embeddings.npz",
    "embeddings_meta": "data/cache/clip_image_embeddings.npz.json",
    "fusion_metrics": "results/metrics/fusion.json",
    "grid": "results/fusion/grid.csv",
    "per_speaker": "results/fusion/per_speaker.csv",
    "changed": "results/fusion/changed.parquet",
    "projector_metrics": "results/metrics/projector.json",
    "projector_log": "results/projector/train_log.csv",
    "projector_hyps": "results/projector/hyps.parquet",
    "retrieval_metrics": "results/metrics/retrieval.json",
    "recall_at_k": "results/clap/recall_at_k.csv",
    "clap_log": "results/clap/train_log.csv",
    "fusion_adapted_metrics": "results/metrics/fusion_adapted.json",
    "adapt_metrics": "results/metrics/adapt.json",
    "adapt_log": "results/adapt/train_log.csv",
    "probe_metrics": "results/metrics/probe.json",
    "reliability": "results/probe/reliability.csv",
    "benchmarks": "results/benchmarks.json",
    "rescoring_benchmark": "results/benchmarks/rescoring.json",
    "benchmarks_dir": "results/benchmarks",
    "pretrain_dir": "results/pretrain",
    "metrics_dir": "results/metrics",
}

# Inputs that stay paths (folders, binary files, the n-best of which only the metadata is shown).
PATH_INPUTS = {"nbest", "embeddings", "images_dir", "benchmarks_dir", "pretrain_dir", "metrics_dir"}

# Files whose sha256 goes into the provenance table (when they exist).
HASHED_INPUTS = ("manifest", "rejects", "split_excluded", "images", "nbest", "embeddings", "grid", "per_speaker",
                 "changed", "projector_hyps", "recall_at_k", "reliability")

PACKAGES = ("mmasr", "torch", "torchaudio", "transformers", "safetensors", "snakemake", "dvc", "numpy", "scipy",
            "pandas", "pyarrow", "jiwer", "scikit-learn", "soundfile", "pillow", "matplotlib")

PRETRAINED = ("whisper", "clip", "lm", "text_encoder")
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Missing:
    """An input that is absent (``error`` None) or could not be read (``error`` says why)."""

    path: str
    error: str | None = None

    def html(self) -> str:
        if self.error is None:
            return f"not run yet (missing <code>{esc(self.path)}</code>)"
        return f"could not read <code>{esc(self.path)}</code>: {esc(self.error)}"


def missing(x: Any) -> bool:
    return isinstance(x, Missing)


# --------------------------------------------------------------------------- reading


def _read(path: Path) -> Any:
    name = path.name
    if name.endswith(".json"):
        return json.loads(path.read_text())
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    if name.endswith(".csv"):
        return pd.read_csv(path)
    raise ValueError(f"{path}: unknown file type")


def load_inputs(paths: Mapping[str, Path]) -> dict[str, Any]:
    """Read every table/metrics input that exists; folders and binary files stay paths.

    An absent file becomes ``Missing(path)``; one that cannot be parsed ``Missing(path, error)``
    (logged as a warning): the report still renders, and that section says what went wrong.
    """
    out: dict[str, Any] = {}
    for key, path in paths.items():
        path = Path(path)
        if key in PATH_INPUTS:
            out[key] = path if path.exists() else Missing(str(path))
            continue
        if not path.is_file():
            out[key] = Missing(str(path))
            continue
        try:
            out[key] = _read(path)
        except Exception as exc:  # noqa: BLE001 - any parse error is shown in its section
            log.warning("report: cannot read %s: %s", path, exc)
            out[key] = Missing(str(path), f"{type(exc).__name__}: {exc}")
    return out


def parquet_metadata(path: Path) -> dict[str, str]:
    from mmasr.io import read_metadata

    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - absent or unreadable: no metadata to show
        return {}


# --------------------------------------------------------------------------- small HTML helpers


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """A value for a table cell: floats to ``digits`` places, ints with thousands separators."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}f}"
    if isinstance(x, (list, tuple)):
        return ", ".join(str(v) for v in x)
    if isinstance(x, dict):
        return ", ".join(f"{k}: {v}" for k, v in x.items())
    return str(x)


def pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "", raw_cols: Iterable[int] = ()) -> str:
    """An HTML table; cells are formatted with ``fmt`` and escaped, except the column indices in
    ``raw_cols`` (already HTML built by this module)."""
    raw = set(raw_cols)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            text = str(v) if i in raw else esc(fmt(v))
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{text}</p>'


def plot_part(data, label: str, columns: set[str], heading: str, plot) -> str:
    """``plot(data)`` under its heading; a note saying why when the input is missing; nothing when it
    lacks the columns the plot needs."""
    if missing(data):
        return note(f"{label}: {data.html()}", "missing")
    return f"<h3>{esc(heading)}</h3>" + plot(data) if columns <= set(data.columns) else ""


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def not_run(sid: str, title: str, why: Missing) -> str:
    """The whole section when its stage's main output is absent (or unreadable)."""
    text = f"This stage has {why.html()}." if why.error is None else f"{why.html()[0].upper()}{why.html()[1:]}."
    return section(sid, title, note(text, "missing"))


def img_tag(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure(fig, alt: str) -> str:
    """A matplotlib figure as an embedded PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return img_tag(buf.getvalue(), alt)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def thumbnail_png(path: Path, size: int) -> bytes | None:
    """A picture as small PNG bytes (longest side ``size``), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return buf.getvalue()


def thumbnail(path: Path, size: int) -> str | None:
    """A picture as a small embedded PNG, or None when it cannot be read."""
    png = thumbnail_png(path, size)
    return None if png is None else img_tag(png, f"picture {path.stem}", cls="thumb")


def word_diff(ref: str, hyp: str) -> str:
    """``hyp`` as HTML with the words that do not align with ``ref`` marked (deleted words struck)."""
    r, h = str(ref).split(), str(hyp).split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=r, b=h, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(esc(" ".join(h[j1:j2])))
        else:
            if j2 > j1:
                out.append(f'<mark>{esc(" ".join(h[j1:j2]))}</mark>')
            if op == "delete" or (op == "replace" and i2 - i1 > j2 - j1):
                out.append(f'<del>{esc(" ".join(r[i1 + (j2 - j1) if op == "replace" else i1:i2]))}</del>')
    return " ".join(out) or "<em>(empty)</em>"


def _num(d: Mapping[str, Any], key: str) -> Any:
    v = d.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --------------------------------------------------------------------------- sections


def split_group_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Utterances, speakers and hours per split and group (and totals), one row per split."""
    df = manifest.copy()
    df["group"] = df["group"].fillna("unknown").astype(str) if "group" in df else "all"
    df["split"] = df["split"].fillna("none").astype(str) if "split" in df else "all"
    groups = sorted(df["group"].unique())
    splits = [s for s in SPLITS if s in set(df["split"])] + sorted(set(df["split"]) - set(SPLITS))
    rows = []
    for split in [*splits, "total"]:
        part = df if split == "total" else df[df["split"] == split]
        row: dict[str, Any] = {"split": split}
        for g in [*groups, "all"]:
            sub = part if g == "all" else part[part["group"] == g]
            row[f"{g}_utts"] = len(sub)
            row[f"{g}_speakers"] = sub["speaker"].nunique()
        row["hours"] = float(part["duration_s"].sum()) / 3600 if "duration_s" in part else None
        rows.append(row)
    return pd.DataFrame(rows)


def data_section(d: Mapping[str, Any]) -> str:
    sid, title = "data", "Data"
    manifest = d["manifest"]
    if missing(manifest):
        return not_run(sid, title, manifest)
    parts = []
    pre = d["preprocess_metrics"]
    if not missing(pre):
        parts.append(note(
            f"{fmt(pre.get('n_input'))} input utterances: {fmt(pre.get('n_kept'))} kept, "
            f"{fmt(pre.get('n_rejected'))} rejected; {fmt(_num(pre, 'audio_hours'), 3)} h of audio kept"
            + (f"; {fmt(pre.get('n_kept_without_image'))} kept without a usable picture (ASR-only)"
               if "n_kept_without_image" in pre else "") + "."))
    counts = split_group_counts(manifest)
    groups = [c[: -len("_utts")] for c in counts.columns if c.endswith("_utts")]
    headers = ["split"] + [f"{g} {w}" for g in groups for w in ("utterances", "speakers")] + ["hours"]
    rows = [[r["split"]] + [r[f"{g}_{w}"] for g in groups for w in ("utts", "speakers")] + [r["hours"]]
            for r in counts.to_dict("records")]
    parts.append("<h3>Utterances and speakers per split and group</h3>" + table(headers, rows))
    if {"split", "speaker"} <= set(manifest.columns):
        spk = manifest.groupby("split", observed=True)["speaker"].unique()
        parts.append(table(["split", "speakers"], [[s, " ".join(sorted(map(str, spk[s])))]
                                                   for s in SPLITS if s in spk.index], cls="compact"))
    parts.append(excluded_part(d.get("split_metrics"), d.get("split_excluded")))
    if "duration_s" in manifest.columns and len(manifest):
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6.4, 2.8))
        dur = manifest["duration_s"].astype(float)
        bins = np.histogram_bin_edges(dur, bins=min(30, max(5, len(dur) // 10)))
        for g, sub in manifest.groupby(manifest["group"].fillna("unknown") if "group" in manifest else 0):
            ax.hist(sub["duration_s"].astype(float), bins=bins, alpha=0.6, label=str(g))
        ax.set_xlabel("duration (s)")
        ax.set_ylabel("utterances")
        ax.set_title(f"Utterance durations (n={len(dur)}, median {dur.median():.2f} s)")
        ax.legend(frameon=False)
        parts.append("<h3>Duration histogram</h3>" + figure(fig, "histogram of utterance durations by group"))
    parts.append("<h3>Rejects by reason</h3>")
    rejects = d["rejects"]
    if missing(rejects):
        parts.append(note(rejects.html(), "missing"))
    elif len(rejects) == 0:
        parts.append(note("Nothing was rejected."))
    else:
        cols = [c for c in ("stage", "kind", "reason") if c in rejects.columns]
        grouped = rejects.fillna("").groupby(cols, sort=True)
        rows = []
        for key, sub in grouped:
            key = key if isinstance(key, tuple) else (key,)
            example = sub["detail"].iloc[0] if "detail" in sub else (sub["id"].iloc[0] if "id" in sub else "")
            rows.append([*key, len(sub), example])
        rows.sort(key=lambda r: (-r[len(cols)], r[:len(cols)]))
        parts.append(table([*cols, "count", "example"], rows))
    return section(sid, title, "\n".join(parts))


def excluded_part(metrics: Any, excluded: Any) -> str:
    """What split.disjoint_text moved out of dev/test (split.json's counts, excluded.parquet's rows by split
    and reason with an example match), or, with it off, how many dev/test utterances share a transcript
    with train. Nothing when split.json is absent or predates these keys."""
    if not isinstance(metrics, Mapping) or "disjoint_text" not in metrics:
        return ""
    if not metrics["disjoint_text"]:
        shared = [f"{fmt(metrics.get(f'{s}_n_text_in_train'))} {s}" for s in ("dev", "test")
                  if f"{s}_n_text_in_train" in metrics]
        return note("Prompt-disjoint splits are off (<code>split.disjoint_text: false</code>)"
                    + (f": {', '.join(shared)} utterances share a normalised transcript with train." if shared else "."))
    out = ["<h3>Moved out of dev/test (prompt-disjoint splits)</h3>", note(
        f"{fmt(metrics.get('n_excluded'))} dev/test utterances left out of the manifest: "
        f"{fmt(metrics.get('n_excluded_text_overlap'))} whose normalised transcript and "
        f"{fmt(metrics.get('n_excluded_image_overlap'))} whose picture also occurs in train "
        f"(dev {fmt(metrics.get('dev_n_excluded'))}, test {fmt(metrics.get('test_n_excluded'))})."
        + (f" split.disjoint_text: partition also moved {fmt(metrics.get('n_excluded_text_held_out'))} train utterances "
           f"of a held-out prompt out." if metrics["disjoint_text"] == "partition" else ""))]
    if missing(excluded):
        out.append(note(excluded.html(), "missing"))
    elif len(excluded) and {"split", "reason"} <= set(excluded.columns):
        rows = []
        for (split, reason), sub in excluded.fillna("").groupby(["split", "reason"], sort=True):
            example = sub["match"].iloc[0] if "match" in sub else ""
            rows.append([split, reason, len(sub), sub["speaker"].nunique() if "speaker" in sub else None, example])
        out.append(table(["split", "reason", "utterances", "speakers", "example match"], rows))
    return "\n".join(out)


def _wer_row(name: str, m: Mapping[str, Any], suffix: str) -> list[Any]:
    return [name, _num(m, f"dev_wer_{suffix}"), _num(m, f"test_wer_{suffix}"), _num(m, f"test_wer_{suffix}_impaired"),
            _num(m, f"test_wer_{suffix}_control"), _num(m, f"test_S_{suffix}"), _num(m, f"test_D_{suffix}"),
            _num(m, f"test_I_{suffix}")]


def grid_plot(grid: pd.DataFrame, best_alpha: float | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for split, sub in grid.sort_values("alpha").groupby("split", sort=False):
        ax.plot(sub["alpha"], sub["wer"], marker="o", ms=3, label=str(split))
        if best_alpha is not None:
            hit = sub[np.isclose(sub["alpha"], best_alpha)]
            if len(hit):
                ax.plot(hit["alpha"], hit["wer"], "k*", ms=10, zorder=5)
    if best_alpha is not None:
        ax.axvline(best_alpha, color="k", ls="--", lw=1, label=f"chosen α = {best_alpha:g} (dev)")
    ax.set_xlabel("α (weight of the picture)")
    ax.set_ylabel("WER")
    ax.set_title("WER vs α")
    ax.legend(frameon=False)
    return figure(fig, "WER against alpha on dev and test, chosen alpha marked")


def pick_examples(changed: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` changed transcripts: regressions first (the worst, at most a third of ``n``), then
    the biggest improvements, taking speakers in turn so one speaker does not fill the table; ties in
    utterance-id order, so the choice is deterministic."""
    if n <= 0 or len(changed) == 0:
        return changed.iloc[:0]
    df = changed.copy()
    df["_gain"] = (df["before_errors"] - df["after_errors"]) if {"before_errors", "after_errors"} <= set(df) else 0
    df["_id"] = df["utt_id"].astype(str) if "utt_id" in df else np.arange(len(df)).astype(str)
    df = df.sort_values("_id")
    df["_turn"] = df.groupby(["_gain", "speaker"] if "speaker" in df else ["_gain"]).cumcount()
    worse = df[df["_gain"] < 0].sort_values(["_gain", "_turn", "_id"]).head(max(1, n // 3))
    rest = df.drop(worse.index).sort_values(["_gain", "_turn", "_id"], ascending=[False, True, True])
    return pd.concat([worse, rest.head(n - len(worse))]).drop(columns=["_gain", "_id", "_turn"])


def _image_paths(d: Mapping[str, Any], root: Path) -> dict[str, Path]:
    images = d.get("images")
    out: dict[str, Path] = {}
    if images is not None and not missing(images) and {"image_id", "path"} <= set(images.columns):
        for iid, p in zip(images["image_id"], images["path"]):
            p = Path(p)
            out[str(iid)] = p if p.is_absolute() else root / p
    return out


def examples_table(examples: pd.DataFrame, d: Mapping[str, Any], root: Path, thumb_px: int) -> str:
    paths = _image_paths(d, root)
    images_dir = d.get("images_dir")
    rows = []
    for r in examples.to_dict("records"):
        iid = r.get("image_id")
        pic = None
        if iid is not None and not (isinstance(iid, float) and math.isnan(iid)):
            path = paths.get(str(iid))
            if path is None and images_dir is not None and not missing(images_dir):
                path = Path(images_dir) / f"{iid}.png"
            pic = thumbnail(path, thumb_px) if path is not None else None
        who = f'{esc(r.get("utt_id", ""))}<br><span class="dim">{esc(r.get("speaker", ""))} · {esc(r.get("group", ""))}</span>'
        ref = str(r.get("reference", ""))
        errs = ""
        if "before_errors" in r and "after_errors" in r:
            errs = f'{int(r["before_errors"])} → {int(r["after_errors"])}'
        rows.append([pic or '<span class="dim">no picture</span>', who, esc(ref),
                     word_diff(ref, r.get("before", "")), word_diff(ref, r.get("after", "")), esc(errs)])
    return table(["picture", "utterance", "reference", "before (ASR only)", "after (with the picture)", "errors"],
                 rows, cls="examples", raw_cols=range(6))


def nbest_depth_note(meta: Mapping[str, str]) -> str:
    """How deep the n-best lists are: utterances by number of distinct hypotheses, and truncated beams."""
    from mmasr.rescoring.nbest import STATS_PREFIX, distinct_histogram

    hist = distinct_histogram(meta)
    if not hist:
        return ""
    n = sum(hist.values())
    mean = sum(k * v for k, v in hist.items()) / n
    decoding = json.loads(meta.get("mmasr.decoding", "{}"))
    asked = (f" (beam {decoding['num_beams']}, {decoding['num_return_sequences']} returned, up to "
             f"{decoding['keep']} kept)" if {"num_beams", "num_return_sequences", "keep"} <= set(decoding) else "")
    bins = ", ".join(f"{k}: {v}" for k, v in sorted(hist.items()))
    return (f"n-best depth{asked}: distinct hypotheses per utterance after normalisation — {bins} "
            f"(utterances; mean {mean:.2f}, {sum(v for k, v in hist.items() if k >= 2) / n:.0%} with two or more). "
            f"Beams cut by max_new_tokens before end-of-text: {meta.get(STATS_PREFIX + 'truncated_dropped', '0')} "
            f"dropped; {meta.get(STATS_PREFIX + 'utts_all_truncated', '0')} utterances had only such beams "
            "(kept, flagged incomplete, compared only with each other).")


def _verdict(lo: float | None, hi: float | None, subject: str = "the picture") -> str:
    if lo is None or hi is None:
        return ""
    return (f" — {subject} helps (interval below zero)" if hi < 0 else
            f" — {subject} hurts (interval above zero)" if lo > 0 else " — no clear difference (interval spans zero)")


def swap_note(m: Mapping[str, Any], kind: str) -> str:
    """The picture-swap control beside the fused WER: the same α with every test picture given to
    another utterance. A gain that survives the swap comes from the fusion, not from the picture."""
    if "test_wer_fused_swapped" not in m:
        return ""
    swapped, asr = _num(m, "test_wer_fused_swapped"), _num(m, "test_wer_asr")
    if swapped is None:
        return note("Picture-swap control: not possible on this test split (fewer than two utterances with a "
                    "picture, or one picture shown to more than half of them).", "missing")
    lo, hi = _num(m, "test_wer_fused_swapped_ci_low"), _num(m, "test_wer_fused_swapped_ci_high")
    ci = f", {kind} 95% interval [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""
    diff = swapped - asr if asr is not None else None
    return note(f"<b>Picture-swap control</b> (same α, each test picture given to another utterance, "
                f"{fmt(m.get('test_swap_permutations'))} seeded permutations averaged): test WER {fmt(swapped)} "
                f"against fused {fmt(_num(m, 'test_wer_fused'))}; swapped − ASR-only {fmt(diff)}{ci}"
                f"{_verdict(lo, hi, 'a wrong picture')}. A real picture effect shows as a fused gain that vanishes "
                "or reverses here.")


FORM_FORMULAS = {
    "log_linear": "score = Whisper's total log-probability + λ_clip · τ · CLIP cosine (+ λ_lm · LM total "
                  "log-probability) + β · Whisper tokens",
    "seed": "fused = (1 − α) · softmax(ASR score) + α · softmax(τ · CLIP cosine)",
}


def form_weights(m: Mapping[str, Any], form: str, system: str = "fused") -> str:
    """The dev-chosen weights of one form's system, as text ("α = 0.15", "λ_clip = 0.316, β = 0.5")."""
    w = m.get(f"weights_{system}_{form}_form")
    if form == "seed" and not w and system == "fused":
        w = {"alpha": _num(m, "best_alpha")}  # a fusion.json written before the forms
    if not w:
        return "not run"
    names = {"alpha": "α", "lambda_clip": "λ_clip", "lambda_lm": "λ_lm", "beta": "β", "w_asr": "w_asr",
             "w_clip": "w_clip", "w_lm": "w_lm"}
    return ", ".join(f"{names.get(k, k)} = {fmt(v, 3)}" for k, v in w.items()
                     if not (system == "fused" and k == "lambda_lm"))


def speakers_text(m: Mapping[str, Any], group: str | None = None) -> str:
    """" (N test speakers)" beside an interval, from fusion.json's ``test_n_speakers[_group]`` ("" when absent)."""
    n = m.get("test_n_speakers" if group is None else f"test_n_speakers_{group}")
    return "" if n is None else f" ({n} test speaker{'s' if n != 1 else ''})"


def verdict_note(m: Mapping[str, Any]) -> str:
    """The picture verdict (:func:`mmasr.metrics.verdict.picture_verdict`) from the fused − ASR-only and the paired
    fused − swapped intervals, with its reason."""
    lo, hi = _num(m, "test_wer_diff_ci_low"), _num(m, "test_wer_diff_ci_high")
    vs_lo, vs_hi = _num(m, "test_wer_fused_vs_swapped_ci_low"), _num(m, "test_wer_fused_vs_swapped_ci_high")
    if lo is None or hi is None:
        return ""
    _, sentence = picture_verdict((lo, hi), None if vs_lo is None or vs_hi is None else (vs_lo, vs_hi))
    return note(f"<b>Verdict</b>: {esc(sentence)}.")


def interval_text(m: Mapping[str, Any], low_key: str, high_key: str, group: str | None = None) -> str:
    lo, hi = _num(m, low_key), _num(m, high_key)
    return "–" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]{speakers_text(m, group)}"


def group_intervals_table(m: Mapping[str, Any], groups: Iterable[str]) -> str:
    """Per group: test speakers, fused − ASR-only, fused − swapped (and CLIP over LM) intervals, and the verdict."""
    rows = []
    with_lm = _num(m, "test_wer_clip_over_lm_ci_low") is not None
    for g in groups:
        diff = (_num(m, f"test_wer_diff_ci_low_{g}"), _num(m, f"test_wer_diff_ci_high_{g}"))
        vs = (_num(m, f"test_wer_fused_vs_swapped_ci_low_{g}"), _num(m, f"test_wer_fused_vs_swapped_ci_high_{g}"))
        code = picture_verdict(diff, None if None in vs else vs)[0] if None not in diff else "–"
        row = [g, m.get(f"test_n_speakers_{g}"),
               interval_text(m, f"test_wer_diff_ci_low_{g}", f"test_wer_diff_ci_high_{g}", g),
               interval_text(m, f"test_wer_fused_vs_swapped_ci_low_{g}", f"test_wer_fused_vs_swapped_ci_high_{g}", g)]
        if with_lm:
            row.append(interval_text(m, f"test_wer_clip_over_lm_ci_low_{g}", f"test_wer_clip_over_lm_ci_high_{g}", g))
        rows.append(row + [code.replace("_", " ")])
    heads = ["group", "test speakers", "fused − ASR-only (95%)", "fused − swapped (95%)"]
    heads += ["ASR+CLIP+LM − ASR+LM (95%)"] if with_lm else []
    return "<h3>Intervals per group (test)</h3>" + table(heads + ["verdict"], rows)


def rescoring_section(d: Mapping[str, Any], root: Path, n_examples: int, thumb_px: int) -> str:
    sid, title = "rescoring", "Rescoring with the picture"
    m = d["fusion_metrics"]
    if missing(m):
        return not_run(sid, title, m)
    parts = [note('Every test utterance with its audio, picture, n-best scores and a live re-fusion slider: '
                  '<a href="browser.html" id="browser-link">the error browser</a> (<code>results/browser.html</code>, '
                  'written by the <code>browser</code> rule beside this page).')]
    form = m.get("fusion_form") or "seed"
    other = next(f for f in FORM_FORMULAS if f != form)
    if m.get("fusion_skipped"):
        parts.append(note(f"<b>Rescoring with the picture skipped</b>: {esc(m.get('fusion_skip_reason') or '')}. "
                          + ("The fused row below is the ASR-only result." if form == "seed" else
                             "The fused row below has no CLIP term."), "missing"))
    alpha = _num(m, "best_alpha")
    chosen = f"<b>{esc(form_weights(m, form))}</b>" if form != "seed" else f"α = <b>{fmt(alpha, 2)}</b>"
    parts.append(note(
        f"Headline form <code>{form}</code>: {esc(FORM_FORMULAS[form])}, {chosen} chosen on dev, "
        f"τ = {fmt(_num(m, 'tau'), 1)}"
        + (f"; the {other.replace('_', '-')} form ({esc(FORM_FORMULAS[other])}, {esc(form_weights(m, other))}) is "
           "reported beside it" if "fusion_form" in m else "")
        + f". ASR-only is Whisper's own first hypothesis. Test: {fmt(m.get('n_test_utts'))} utterances "
        f"({fmt(m.get('test_ref_words'))} reference words, {fmt(m.get('test_n_speakers'))} speakers), "
        f"{fmt(m.get('n_no_image'))} without a picture (no CLIP term). Corpus WER from pooled errors."))
    label = f"α = {fmt(alpha, 2)}" if form == "seed" else form_weights(m, form)
    rows = [_wer_row("ASR only (Whisper 1-best)", m, "asr"), _wer_row(f"fused, {form.replace('_', '-')} ({label})", m, "fused")]
    if m.get(f"test_wer_fused_{other}_form") is not None:
        rows.append(_wer_row(f"fused, {other.replace('_', '-')} form ({form_weights(m, other)})", m, f"fused_{other}_form"))
    if "test_wer_fused_swapped" in m:
        rows.append(_wer_row(f"fused, pictures swapped (control, {label})", m, "fused_swapped"))
    if "test_wer_alpha1" in m:
        rows.append(_wer_row("picture alone (α = 1)", m, "alpha1"))
    rows.append(_wer_row("n-best oracle (lower bound)", m, "oracle"))
    parts.append(table(["system", "dev WER", "test WER", "test WER impaired", "test WER control",
                        "S", "D", "I"], rows))
    diff, lo, hi = _num(m, "test_wer_diff"), _num(m, "test_wer_diff_ci_low"), _num(m, "test_wer_diff_ci_high")
    if diff is None and None not in (_num(m, "test_wer_fused"), _num(m, "test_wer_asr")):
        diff = m["test_wer_fused"] - m["test_wer_asr"]
    kind = {"speaker": "speaker-level bootstrap (speakers within group, then their utterances)",
            "utterance": "utterance-level bootstrap (too few speakers per group for a speaker-level one)"}.get(
        m.get("test_wer_diff_ci_level"), "paired bootstrap")
    if diff is not None:
        ci = f", {kind} 95% interval [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""
        ci = f", {kind} 95% interval [{fmt(lo)}, {fmt(hi)}]{speakers_text(m)}" if lo is not None and hi is not None else ""
        parts.append(note(f"<b>Fused − ASR-only test WER: {fmt(diff)}</b>{ci}{_verdict(lo, hi, 'rescoring')}. Share of "
                          f"the gap between ASR-only and the oracle closed: {pct(_num(m, 'test_gap_closed'))}."))
    parts.append(swap_note(m, kind))
    vs, vs_lo, vs_hi = (_num(m, k) for k in ("test_wer_fused_vs_swapped", "test_wer_fused_vs_swapped_ci_low",
                                             "test_wer_fused_vs_swapped_ci_high"))
    if vs is not None and vs_lo is not None and vs_hi is not None:
        parts.append(note(f"<b>Fused − swapped test WER: {fmt(vs)}</b>, paired {kind} 95% interval [{fmt(vs_lo)}, "
                          f"{fmt(vs_hi)}]{speakers_text(m)} (the same resamples as fused − ASR-only; each utterance's "
                          f"swapped errors averaged over the permutations){_verdict(vs_lo, vs_hi, 'the right picture')}."))
    co, co_lo, co_hi = (_num(m, k) for k in ("test_wer_clip_over_lm", "test_wer_clip_over_lm_ci_low",
                                             "test_wer_clip_over_lm_ci_high"))
    if co is not None and co_lo is not None and co_hi is not None:
        parts.append(note(f"<b>ASR+CLIP+LM − ASR+LM test WER: {fmt(co)}</b>, paired 95% interval [{fmt(co_lo)}, "
                          f"{fmt(co_hi)}]{speakers_text(m)}{_verdict(co_lo, co_hi, 'CLIP over the LM')}."))
    parts.append(verdict_note(m))
    groups = sorted(k.removeprefix("test_n_speakers_") for k in m if k.startswith("test_n_speakers_"))
    if groups:
        parts.append(group_intervals_table(m, groups))
    few = few_speakers_warning({g: m.get(f"test_n_speakers_{g}") for g in groups})
    if few:
        parts.append(note(esc(few), "missing"))
    depth = nbest_depth_note(d.get("nbest_meta") or {})
    if depth:
        parts.append(note(depth))
    parts.append(plot_part(d["grid"], "WER vs α", {"alpha", "split", "wer"}, "WER vs α",
                           lambda grid: grid_plot(grid, alpha)))
    per = d["per_speaker"]
    if not missing(per) and {"level", "name"} <= set(per.columns):
        cols = [c for c in ("n_utts", "ref_words", "wer_asr", "wer_fused", "wer_fused_swapped", "wer_oracle")
                if c in per.columns]
        heads = {"n_utts": "utterances", "ref_words": "words", "wer_asr": "WER ASR only", "wer_fused": "WER fused",
                 "wer_fused_swapped": "WER fused, pictures swapped", "wer_oracle": "WER oracle"}
        groups = per[per["level"] == "group"]
        if len(groups):
            parts.append("<h3>Per group (test)</h3>" + table(["group"] + [heads[c] for c in cols],
                                                              groups[["name", *cols]].values.tolist()))
        spk = per[per["level"] == "speaker"].copy()
        if len(spk):
            manifest = d["manifest"]
            extra = []
            if not missing(manifest) and {"speaker", "group"} <= set(manifest.columns):
                spk["group"] = spk["name"].map(manifest.drop_duplicates("speaker").set_index("speaker")["group"])
                extra = ["group"]
            parts.append("<h3>Per speaker (test)</h3>" + table(["speaker", *extra] + [heads[c] for c in cols],
                                                                spk[["name", *extra, *cols]].values.tolist()))
    elif missing(per):
        parts.append(note(f"Per-speaker table: {per.html()}", "missing"))
    changed = d["changed"]
    parts.append("<h3>Where the picture changed the transcript</h3>")
    if missing(changed):
        parts.append(note(changed.html(), "missing"))
    elif len(changed) == 0:
        parts.append(note("No test utterance has a picture, so none could change." if m.get("n_no_image") is not None
                          and m.get("n_no_image") == m.get("n_test_utts") else "The picture changed no test transcript."))
    else:
        summary = f"{len(changed)} test transcripts changed"
        if {"before_errors", "after_errors"} <= set(changed.columns):
            gain = changed["before_errors"] - changed["after_errors"]
            summary += f": {int((gain > 0).sum())} better, {int((gain < 0).sum())} worse, {int((gain == 0).sum())} as many errors"
        ex = pick_examples(changed, n_examples)
        parts.append(note(f"{summary}. {len(ex)} shown (regressions first); words that differ from the reference "
                          f"are <mark>marked</mark>, missing ones <del>struck</del>."))
        parts.append(examples_table(ex, d, root, thumb_px))
    return section(sid, title, "\n".join(parts))


def loss_plot(log_df: pd.DataFrame, title: str, y_cols: Iterable[str], alt: str, x: str = "step") -> str | None:
    cols = [c for c in y_cols if c in log_df.columns and log_df[c].notna().any()]
    if x not in log_df.columns or not cols:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    for c in cols:
        sub = log_df[[x, c]].dropna()
        sparse = len(sub) < 0.5 * len(log_df)  # evaluated every N steps: points, not a line
        ax.plot(sub[x], sub[c], marker="o" if sparse else None, ms=3, lw=1.2 if not sparse else 1, label=c)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(x)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(frameon=False)
    return figure(fig, alt)


ADAPT_OFF = ("Adaptation is off (<code>adapt.enabled: false</code>): set it to true (in a config file, or "
             "<code>snakemake --config adapt='{enabled: true}'</code>) to add the LoRA-adapted Whisper, this table of "
             "systems and its loss curve.")


def systems_section(d: Mapping[str, Any]) -> str:
    """Zero-shot and adapted Whisper x ASR-only, +LM, +CLIP, +CLIP+LM: the rows of results/tables/systems.md
    (:func:`mmasr.report.systems.systems_rows`), and the adaptation's loss curve; one sentence when adaptation
    is off."""
    from mmasr.report.systems import GROUPS, NOTE, format_cell, headers, speaker_counts, systems_rows

    sid, title = "systems", "Systems (zero-shot and LoRA-adapted Whisper)"
    if not d.get("adapt_enabled"):
        return section(sid, title, note(ADAPT_OFF))
    zero, adapted = d["fusion_metrics"], d["fusion_adapted_metrics"]
    for m in (zero, adapted):
        if missing(m):
            return not_run(sid, title, m)
    models = {"zero-shot": zero, "adapted": adapted}
    rows, counts = systems_rows(models), speaker_counts(models)
    parts = [table(["model", "system", "form", *headers(counts)],
                   [[r["model"], r["system"], r["form"] or "–", *(format_cell(r[g], "–") for g in GROUPS)] for r in rows]),
             note(esc(NOTE) + " The same rows as <code>results/tables/systems.md</code> and <code>systems.tex</code>.")]
    few = few_speakers_warning({g: counts.get(g) for g in GROUPS[1:]})
    if few:
        parts.append(note(esc(few), "missing"))
    diff = _num(adapted, "test_wer_asr_vs_reference")
    if diff is not None:
        lo, hi = _num(adapted, "test_wer_asr_vs_reference_ci_low"), _num(adapted, "test_wer_asr_vs_reference_ci_high")
        parts.append(note(f"<b>Adaptation</b>: adapted − zero-shot ASR-only test WER {fmt(diff)}, 95% interval "
                          f"[{fmt(lo)}, {fmt(hi)}] ({esc(adapted.get('test_wer_asr_vs_reference_ci_level', ''))}-level)"
                          f"{_verdict(lo, hi, 'adaptation')}."))
    a = d["adapt_metrics"]
    if not missing(a):
        parts.append(note(f"LoRA: {fmt(a.get('n_adapter_params'))} adapter parameters on a frozen base of "
                          f"{fmt(a.get('n_base_params'))}; {fmt(a.get('steps'))} steps on {fmt(a.get('n_train_utts'))} "
                          f"train utterances; kept step {fmt(a.get('best_step'))} (best dev loss "
                          f"{fmt(_num(a, 'best_dev_loss'))}, first {fmt(_num(a, 'first_dev_loss'))})."))
    tl = d["adapt_log"]
    if missing(tl):
        parts.append(note(f"Loss curve: {tl.html()}", "missing"))
    else:
        plot = loss_plot(tl, "Whisper LoRA adaptation", ("loss", "dev_loss"), "adaptation train and dev loss")
        if plot:
            parts.append("<h3>Adaptation loss</h3>" + plot)
    return section(sid, title, "\n".join(parts))


def projector_section(d: Mapping[str, Any], n_examples: int) -> str:
    sid, title = "projector", "Projector (speech encoder → LM)"
    m = d["projector_metrics"]
    if missing(m):
        return not_run(sid, title, m)
    parts = [note(f"{fmt(m.get('n_trainable_params'))} trainable parameters, {fmt(m.get('steps'))} steps, "
                  f"best dev loss {fmt(_num(m, 'best_dev_loss'))}.")]
    rows = [["projector + LM", _num(m, "test_wer"), _num(m, "test_wer_impaired"), _num(m, "test_wer_control"),
             _num(m, "test_substitutions"), _num(m, "test_deletions"), _num(m, "test_insertions")]]
    fusion = d["fusion_metrics"]
    for name, key, fkey in (("Whisper alone", "whisper_test_wer_asr", "asr"),
                            ("Whisper + picture (fused)", "whisper_test_wer_fused", "fused")):
        value = _num(m, key)
        f = {} if missing(fusion) else fusion
        if value is None:
            value = _num(f, f"test_wer_{fkey}")
        if value is not None:
            same = fkey == "asr" and _num(m, "whisper_test_wer_asr_impaired") is not None  # on the projector's utterances
            rows.append([name, value] + [_num(m, f"whisper_test_wer_asr_{g}") if same else _num(f, f"test_wer_{fkey}_{g}")
                                         for g in ("impaired", "control")]
                        + [_num(f, f"test_S_{fkey}"), _num(f, f"test_D_{fkey}"), _num(f, f"test_I_{fkey}")])
    parts.append(table(["system", "test WER", "impaired", "control", "S", "D", "I"], rows))
    if _num(m, "test_wer_vs_whisper") is not None:
        parts.append(note(f"Projector − Whisper alone on the same {fmt(m.get('n_whisper_compared_utts'))} test "
                          f"utterances: {fmt(_num(m, 'test_wer_vs_whisper'))} "
                          f"[{fmt(_num(m, 'test_wer_vs_whisper_ci_low'))}, {fmt(_num(m, 'test_wer_vs_whisper_ci_high'))}] "
                          f"(95% {m.get('test_wer_vs_whisper_ci_level', 'speaker')}-level bootstrap interval)."))
    tl = d["projector_log"]
    if missing(tl):
        parts.append(note(f"Loss curves: {tl.html()}", "missing"))
    else:
        plot = loss_plot(tl, "Projector training", ("train_loss", "dev_loss"), "projector train and dev loss")
        if plot:
            parts.append("<h3>Loss curves</h3>" + plot)
    hyps = d["projector_hyps"]
    if not missing(hyps) and {"ref", "hyp"} <= set(hyps.columns) and n_examples > 0:
        wrong = hyps[hyps["ref"].astype(str) != hyps["hyp"].astype(str)]
        wrong = wrong.sort_values("utt_id") if "utt_id" in wrong else wrong
        parts.append(f"<h3>Errors ({len(wrong)} of {len(hyps)} test transcripts differ from the reference)</h3>")
        if len(wrong):
            rows = [[esc(r.get("utt_id", "")), esc(r.get("group", "")), esc(r["ref"]), word_diff(r["ref"], r["hyp"])]
                    for r in wrong.head(n_examples).to_dict("records")]
            parts.append(table(["utterance", "group", "reference", "projector"], rows, raw_cols=range(4)))
    return section(sid, title, "\n".join(parts))


def clap_section(d: Mapping[str, Any]) -> str:
    sid, title = "clap", "CLAP retrieval (speech ↔ text)"
    m = d["retrieval_metrics"]
    if missing(m):
        return not_run(sid, title, m)
    parts = [note(f"Over {fmt(m.get('n_candidates'))} candidates; chance R@1 = {fmt(_num(m, 'chance_r1'))}.")]
    rows = []
    for direction, name in (("a2t", "audio → text"), ("t2a", "text → audio")):
        for model, prefix in (("zero-shot", "zeroshot_"), ("trained", "")):
            rows.append([name, model] + [_num(m, f"{prefix}{direction}_{k}") for k in ("r1", "r5", "r10", "map10")]
                        + [_num(m, f"{prefix}{direction}_mean_rank"), _num(m, f"{prefix}{direction}_median_rank")])
    heads = ["direction", "model", "R@1", "R@5", "R@10", "mAP@10", "mean rank", "median rank"]
    keep = [i for i in range(len(heads)) if i < 6 or any(r[i] is not None for r in rows)]
    parts.append(table([heads[i] for i in keep], [[r[i] for i in keep] for r in rows]))
    rk = d["recall_at_k"]
    if not missing(rk) and {"direction", "model", "k", "recall"} <= set(rk.columns):
        plt = _plt()
        dirs = [x for x in ("a2t", "t2a") if x in set(rk["direction"])]
        fig, axes = plt.subplots(1, max(1, len(dirs)), figsize=(6.4, 2.8), sharey=True, squeeze=False)
        for ax, direction in zip(axes[0], dirs):
            for model, sub in rk[rk["direction"] == direction].groupby("model"):
                sub = sub.sort_values("k")
                ax.plot(sub["k"], sub["recall"], marker="o", ms=3, label=str(model))
            if _num(m, "n_candidates"):
                ks = np.sort(rk["k"].unique())
                ax.plot(ks, np.minimum(1, ks / m["n_candidates"]), "k:", lw=1, label="chance")
            ax.set_title({"a2t": "audio → text", "t2a": "text → audio"}[direction])
            ax.set_xlabel("k")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylim(0, 1.02)
            ax.legend(frameon=False, loc="lower right")
        axes[0][0].set_ylabel("recall@k")
        parts.append("<h3>Recall@k, zero-shot vs trained</h3>" + figure(fig, "recall at k, zero-shot vs trained, both directions"))
    elif missing(rk):
        parts.append(note(f"Recall@k curves: {rk.html()}", "missing"))
    tl = d["clap_log"]
    if not missing(tl):
        plot = loss_plot(tl, "CLAP training", ("train_loss", "dev_loss"), "CLAP train and dev loss")
        if plot:
            parts.append("<h3>Loss curves</h3>" + plot)
    return section(sid, title, "\n".join(parts))


def reliability_plot(rel: pd.DataFrame) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    for name, sub in rel.groupby("calibration", sort=False):
        sub = sub.sort_values("mean_predicted")
        sizes = 10 + 60 * sub["count"] / max(1, sub["count"].max()) if "count" in sub else 20
        ax.plot(sub["mean_predicted"], sub["fraction_positive"], lw=1.2, label=str(name))
        ax.scatter(sub["mean_predicted"], sub["fraction_positive"], s=sizes, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.set_title("Reliability diagram (marker size: count)")
    ax.legend(frameon=False, loc="upper left")
    return figure(fig, "reliability diagram before and after calibration")


def probe_section(d: Mapping[str, Any]) -> str:
    sid, title = "probe", "Probe calibration"
    m = d["probe_metrics"]
    if missing(m):
        return not_run(sid, title, m)
    def interval(prefix: str) -> str:
        low, high = _num(m, f"{prefix}auc_ci_low"), _num(m, f"{prefix}auc_ci_high")
        return "–" if low is None or high is None else f"[{fmt(low)}, {fmt(high)}]"

    rows = [["audio-encoder embeddings", _num(m, "accuracy"), _num(m, "auc"), interval(""), _num(m, "speaker_auc"),
             _num(m, "brier"), _num(m, "ece_uncalibrated"), _num(m, "ece_calibrated"), m.get("calibration_method", "–")]]
    if _num(m, "baseline_auc") is not None:  # the same probe on plain signal features (mmasr.probe.baseline)
        rows.append(["signal baseline", _num(m, "baseline_accuracy"), _num(m, "baseline_auc"), interval("baseline_"),
                     _num(m, "baseline_speaker_auc"), _num(m, "baseline_brier"), None, None,
                     m.get("baseline_calibration_method", "–")])
    parts = [table(["features", "accuracy", "AUC", "AUC 95% interval (speakers)", "speaker-level AUC", "Brier",
                    "ECE uncalibrated", "ECE calibrated", "calibration"], rows)]
    if _num(m, "baseline_auc") is not None:
        parts.append(note(f"The signal baseline is the same probe on {esc(', '.join(m.get('baseline_features', [])))} "
                          "of the processed audio: where it scores as well, the embeddings' AUC shows no more than "
                          "tempo and recording channel. Speaker-level AUC compares each held-out speaker's mean "
                          f"probability ({fmt(m.get('n_eval_speakers_positive'))} positive, "
                          f"{fmt(m.get('n_eval_speakers_negative'))} negative speakers)."))
    if m.get("calibration_fallback"):
        parts.append(note(f"Calibration requested: {esc(m.get('calibration_requested', '?'))}; "
                          f"{esc(m['calibration_fallback'])}."))
    parts.append(plot_part(d["reliability"], "Reliability diagram", {"calibration", "mean_predicted", "fraction_positive"},
                           "Reliability diagram, before and after calibration", reliability_plot))
    return section(sid, title, "\n".join(parts))


def pretrain_metrics(d: Mapping[str, Any]) -> tuple[dict[str, dict], dict[Path, str]]:
    """``results/metrics/pretrain_<kind>.json`` of each demo model pre-trained in this run, and the files
    among them that could not be read (path -> error)."""
    metrics_dir = d.get("metrics_dir")
    found, unreadable = {}, {}
    if metrics_dir is not None and not missing(metrics_dir):
        for kind in PRETRAINED:
            path = Path(metrics_dir) / f"pretrain_{kind}.json"
            if path.is_file():
                try:
                    found[kind] = json.loads(path.read_text())
                except (ValueError, OSError) as exc:
                    log.warning("report: cannot read %s: %s", path, exc)
                    unreadable[path] = f"{type(exc).__name__}: {exc}"
    return found, unreadable


def skipped_stages(d: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(stage, reason) for each picture stage that had nothing to work on (a corpus without pictures, such as
    TORGO) and said so in its output: CLIP pre-training, the picture cache, the CLIP scores, the fusion."""
    out = []
    clip = pretrain_metrics(d)[0].get("clip", {})
    if clip.get("clip_skipped"):
        out.append(("pretrain_demo_clip", str(clip.get("clip_skip_reason") or "")))
    emb = d.get("embeddings_meta")
    if emb is not None and not missing(emb) and emb.get("skipped"):
        out.append(("cache_image_embeddings", str(emb.get("skip_reason") or "")))
    reason = (d.get("nbest_meta") or {}).get("mmasr.clip_skip_reason")
    if reason:
        out.append(("clip_text_scores", reason))
    fusion = d.get("fusion_metrics")
    if fusion is not None and not missing(fusion) and fusion.get("fusion_skipped"):
        out.append(("fuse (rescoring with the picture)", str(fusion.get("fusion_skip_reason") or "")))
    return out


def skipped_note(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><b>{esc(stage)}</b>: {esc(reason)}</li>" for stage, reason in skipped)
    return (f'<div class="note missing skipped"><b>Skipped picture stages</b> (this corpus lacks the pictures they need; '
            f"everything else ran):<ul>{items}</ul></div>")


def pretrain_section(d: Mapping[str, Any]) -> str:
    sid, title = "pretraining", "Demo model pre-training"
    metrics_dir, log_dir = d["metrics_dir"], d["pretrain_dir"]
    found, unreadable = pretrain_metrics(d)
    bad = note("Unreadable pre-training metrics: " + "; ".join(
        f"<code>{esc(str(path))}</code> ({esc(err)})" for path, err in unreadable.items()) + ".", "missing") \
        if unreadable else ""
    if not found and unreadable:
        return section(sid, title, bad)
    if not found:
        where = metrics_dir.path if missing(metrics_dir) else str(metrics_dir)
        return section(sid, title, note("No demo model pre-trained in this run: the models named by params are not "
                                        "demo models, or the stage has not run yet (no "
                                        f"<code>{esc(Path(where) / 'pretrain_*.json')}</code>).", "missing"))
    rows = []
    for kind, m in found.items():
        extra = {"whisper": ("dev loss", m.get("whisper_final_dev_loss")),
                 "clip": ("test caption→picture R@1", m.get("clip_test_r1"))}.get(kind, ("", None))
        check = f"{extra[0]} {fmt(extra[1])}" if extra[0] else ""
        if m.get(f"{kind}_skipped"):
            check = f"skipped: {m.get(f'{kind}_skip_reason') or 'no reason recorded'}"
        rows.append([kind, m.get(f"{kind}_n_params"), m.get(f"{kind}_steps"), m.get(f"{kind}_final_loss"),
                     m.get(f"{kind}_train_seconds"), check])
    parts = [table(["model", "parameters", "steps", "final train loss", "train seconds", "held-out check"], rows)]
    if bad:
        parts.append(bad)
    if not missing(log_dir):
        plt = _plt()
        logs = {k: Path(log_dir) / f"{k}_loss.csv" for k in found
                if (Path(log_dir) / f"{k}_loss.csv").is_file() and not found[k].get(f"{k}_skipped")}
        if logs:
            fig, axes = plt.subplots(1, len(logs), figsize=(2.6 * len(logs), 2.4), squeeze=False)
            for ax, (kind, path) in zip(axes[0], logs.items()):
                df = pd.read_csv(path)
                if {"step", "loss"} <= set(df.columns):
                    ax.plot(df["step"], df["loss"], lw=0.8, label="train")
                if "dev_loss" in df.columns and df["dev_loss"].notna().any():
                    sub = df[["step", "dev_loss"]].dropna()
                    ax.plot(sub["step"], sub["dev_loss"], "o-", ms=3, label="dev")
                    ax.legend(frameon=False)
                ax.set_title(kind)
                ax.set_xlabel("step")
            axes[0][0].set_ylabel("loss")
            parts.append(figure(fig, "demo pre-training loss curves"))
    return section(sid, title, "\n".join(parts))


def benchmarks_section(d: Mapping[str, Any]) -> str:
    """results/benchmarks.json (benchmarks/run.py: the pipeline's speed benchmarks) and, when present, the rescoring
    benchmark's own results (benchmarks/rescoring.py)."""
    sid, title = "benchmarks", "Speed benchmarks"
    parts = []
    for key in ("benchmarks", "rescoring_benchmark"):
        b = d.get(key)
        if b is None or (missing(b) and b.error is None and key != "benchmarks"):
            continue
        name = f"<h3><code>{esc(Path(DEFAULT_INPUTS[key]).name)}</code></h3>"
        if missing(b):
            parts.append(name + note(b.html(), "missing"))
            continue
        parts.append(name + benchmark_tables(b))
    return section(sid, title, "\n".join(parts))


STAGE_COLUMNS = ("jobs", "wall_s", "cpu_s", "max_rss_mb")  # benchmarks.json ``stages`` columns, in this order


def benchmark_tables(b: Mapping[str, Any]) -> str:
    """A benchmarks JSON object: its measures (with target and device where the file names them:
    ``targets``, ``devices``), its per-stage table (``stages``: rule -> wall s, memory, ...), and any
    other nested object (per-benchmark details) folded away."""
    targets, devices = b.get("targets") or {}, b.get("devices") or {}
    headers = ["measure", "value"] + ["target"] * bool(targets) + ["device"] * bool(devices)
    rows = [[k, v] + [targets.get(k, "")] * bool(targets) + [devices.get(k, "")] * bool(devices)
            for k, v in sorted(b.items()) if not isinstance(v, dict)]
    parts = [table(headers, rows, cls="compact")]
    stages = b.get("stages")
    if isinstance(stages, dict) and stages:
        found = {c for v in stages.values() if isinstance(v, dict) for c in v}
        columns = [c for c in STAGE_COLUMNS if c in found] + sorted(found - set(STAGE_COLUMNS))
        ordered = sorted(((r, v) for r, v in stages.items() if isinstance(v, dict)),
                         key=lambda kv: -float(kv[1].get("wall_s") or 0))
        parts.append("<h4>Per stage (Snakemake benchmarks of the measured run)</h4>"
                     + table(["rule", *columns], [[rule, *(v.get(c) for c in columns)] for rule, v in ordered],
                             cls="compact"))
    for key, value in sorted(b.items()):
        if not isinstance(value, dict) or not value or key in ("targets", "devices", "stages"):
            continue
        groups = value.items() if all(isinstance(v, dict) for v in value.values()) else [("", value)]
        for sub, flat in groups:
            parts.append(f"<details><summary>{esc(': '.join(filter(None, [key, sub])))}</summary>"
                         + table(["measure", "value"], sorted(flat.items()), cls="compact") + "</details>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- provenance


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_state(root: Path) -> dict[str, Any]:
    """Commit and dirty flag of the checkout at ``root``; ``commit`` None where there is no git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """Short sha256 of the params as used (the same recipe as the metrics' ``params_hash``)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def benchmark_table(bench_dir: Path) -> pd.DataFrame:
    """Snakemake benchmark files (``<rule>.tsv``, ``<rule>/<shard>.tsv``) as one row per file:
    rule, job, seconds, max RSS (MB), CPU time. Unreadable files are skipped."""
    rows = []
    paths = sorted(Path(bench_dir).rglob("*.tsv")) if Path(bench_dir).is_dir() else []
    for path in paths:
        try:
            df = pd.read_csv(path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if "s" not in df.columns or not len(df):
            continue
        rel = path.relative_to(bench_dir).with_suffix("")
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.name
        last = df.iloc[-1]  # repeated benchmarks append rows; the last is the latest run
        rows.append({"rule": rule, "job": str(rel), "s": float(last["s"]),
                     "max_rss_mb": float(last["max_rss"]) if "max_rss" in df and pd.notna(last["max_rss"]) else None,
                     "cpu_time_s": float(last["cpu_time"]) if "cpu_time" in df and pd.notna(last["cpu_time"]) else None})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss_mb", "cpu_time_s"])


def per_rule_times(bench: pd.DataFrame) -> pd.DataFrame:
    """Wall seconds per rule (shards summed), largest first."""
    if bench.empty:
        return pd.DataFrame(columns=["rule", "jobs", "s", "max_rss_mb", "cpu_time_s"])
    agg = bench.groupby("rule").agg(jobs=("job", "size"), s=("s", "sum"), max_rss_mb=("max_rss_mb", "max"),
                                    cpu_time_s=("cpu_time_s", "sum")).reset_index()
    return agg.sort_values(["s", "rule"], ascending=[False, True]).reset_index(drop=True)


def model_rows(d: Mapping[str, Any]) -> list[list[str]]:
    """Model ids, revisions, decoding settings and params hashes named by the metrics files, the n-best
    metadata and the embedding cache: one row per (key, value), with the files that name it."""
    named: dict[tuple[str, str], list[str]] = {}

    def add(source: str, key: str, value: Any) -> None:
        named.setdefault((key, fmt(value)), []).append(source)

    metrics_dir = d.get("metrics_dir")
    if metrics_dir is not None and not missing(metrics_dir):
        for path in sorted(Path(metrics_dir).glob("*.json")):
            try:
                m = json.loads(path.read_text())
            except ValueError:
                continue
            for k, v in sorted(m.items()) if isinstance(m, dict) else ():
                if k.startswith("model_") or k.endswith("_revision") or k in ("params_hash", "mmasr_version"):
                    add(path.name, k, v)
    for k, v in sorted((d.get("nbest_meta") or {}).items()):
        if not k.startswith("mmasr.stats."):  # counts, shown in the rescoring section
            add(Path(DEFAULT_INPUTS["nbest"]).name, k.removeprefix("mmasr."), v)
    emb = d.get("embeddings_meta")
    if emb is not None and not missing(emb):
        for k in ("model", "revision", "dimension", "count"):
            if k in emb:
                add(Path(DEFAULT_INPUTS["embeddings_meta"]).name, k, emb[k])
    return [[key, value, ", ".join(sources)] for (key, value), sources in named.items()]


def provenance_section(d: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    sid, title = "provenance", "Provenance"
    git = info["git"]
    commit = git["commit"] or "unknown (not a git checkout)"
    if git["commit"] and git["dirty"]:
        commit += " (with uncommitted changes)"
    parts = [table(["what", "value"], [
        ["git commit", commit], ["params hash", info["params_hash"]], ["params source", info["params_source"]],
        ["report written", info["generated"]], ["mmasr", info["versions"].get("mmasr", "?")],
        ["python", info["python"]], ["platform", info["platform"]]], cls="compact")]
    parts.append("<details open><summary>Parameters (as used)</summary><pre>" + esc(info["params_yaml"]) + "</pre></details>")
    mrows = model_rows(d)
    parts.append("<h3>Models</h3>" + (table(["key", "value", "named in"], mrows, cls="compact") if mrows
                                      else note("No model ids recorded yet.", "missing")))
    hrows = info["hashes"]
    parts.append("<h3>Data hashes (sha256)</h3>" + (table(["file", "bytes", "sha256"], hrows, cls="compact mono")
                                                    if hrows else note("No data files found.", "missing")))
    parts.append("<h3>Package versions</h3>" + table(["package", "version"], sorted(info["versions"].items()), cls="compact"))
    parts.append("<h3>Run time per rule (Snakemake benchmarks)</h3>")
    bench = info["bench"]
    if bench.empty:
        parts.append(note(f"No benchmark files found ({esc(info['bench_dir'])}).", "missing"))
    else:
        rules = per_rule_times(bench)
        rows = [[r["rule"], int(r["jobs"]), r["s"], hms(r["s"]), r["cpu_time_s"], r["max_rss_mb"]]
                for r in rules.to_dict("records")]
        rows.append(["total (sum over jobs)", int(rules["jobs"].sum()), float(rules["s"].sum()),
                     hms(float(rules["s"].sum())), float(rules["cpu_time_s"].sum()), float(rules["max_rss_mb"].max())])
        parts.append(table(["rule", "jobs", "wall s", "h:m:s", "CPU s", "max RSS MB"], rows, cls="compact"))
    return section(sid, title, "\n".join(parts))


def hms(seconds: float) -> str:
    """``seconds`` as h:mm:ss (rounded to the second)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def collect_provenance(d: Mapping[str, Any], paths: Mapping[str, Path], params: Mapping[str, Any],
                       params_source: str, root: Path) -> dict[str, Any]:
    import yaml

    hashes = []
    for key in HASHED_INPUTS:
        path = Path(paths[key])
        if path.is_file():
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            hashes.append([str(shown), path.stat().st_size, sha256_file(path)])
    bench_dir = Path(paths["benchmarks_dir"])
    return {
        "git": git_state(root),
        "params_hash": params_hash(params),
        "params_source": params_source,
        "params_yaml": yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=None, width=100),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hashes": hashes,
        "bench": benchmark_table(bench_dir),
        "bench_dir": str(bench_dir),
    }


# --------------------------------------------------------------------------- the page


SECTIONS = [("data", "Data"), ("rescoring", "Rescoring with the picture"), ("systems", "Systems"),
            ("projector", "Projector"), ("clap", "CLAP retrieval"), ("probe", "Probe calibration"), ("pretraining", "Demo model pre-training"),
            ("benchmarks", "Speed benchmarks"), ("provenance", "Provenance")]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9;line-height:1.45}
header{background:#1f3a5f;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:24px}header p{margin:0;opacity:.85}
nav{padding:8px 32px;background:#e8ecf2;font-size:14px}nav a{margin-right:16px;color:#1f3a5f;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:8px 22px 18px;margin:18px 0}
h2{font-size:20px;border-bottom:2px solid #1f3a5f;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px;color:#33445c}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}th,td{border:1px solid #d5dbe4;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.compact td,table.compact th{padding:2px 6px;font-size:12px}table.mono td{font-family:ui-monospace,Menlo,Consolas,monospace}
table.examples td{font-size:14px}mark{background:#ffe08a;padding:0 2px;border-radius:2px}del{color:#b23;}
img.plot{display:block;max-width:100%;margin:6px 0}img.thumb{display:block;border-radius:4px;border:1px solid #ccd}
.note{font-size:14px}.missing{color:#8a5a00;background:#fff6e0;border-left:4px solid #e0a800;padding:6px 10px}
.dim{color:#6b7686;font-size:12px}pre{background:#f3f5f8;padding:10px;font-size:12px;overflow:auto;max-height:520px}
.kpis{display:flex;flex-wrap:wrap;gap:12px}.kpi{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:8px 14px;min-width:150px}
.kpi b{display:block;font-size:20px;color:#1f3a5f}.kpi span{font-size:12px;color:#6b7686}
"""


def _fused_label(f: Mapping[str, Any]) -> str:
    form = f.get("fusion_form") or "seed"
    return f"α = {fmt(_num(f, 'best_alpha'), 2)}" if form == "seed" else f"log-linear, {form_weights(f, form)}"


def key_results(d: Mapping[str, Any]) -> str:
    """Headline numbers from whichever stages ran."""
    kpis = []  # (value, label, metric): metric names the value's source as data-metric="<stage>.<key>"
    f, p, r, pr = d["fusion_metrics"], d["projector_metrics"], d["retrieval_metrics"], d["probe_metrics"]
    if not missing(f):
        kpis += [(fmt(_num(f, "test_wer_asr")), "test WER, Whisper alone", "fusion.test_wer_asr"),
                 (fmt(_num(f, "test_wer_fused")),
                  ("test WER, fused = ASR-only (picture rescoring skipped)" if f.get("fusion_form", "seed") == "seed"
                   else "test WER, fused without a CLIP term (picture rescoring skipped)") if f.get("fusion_skipped") else
                  f"test WER, with the picture ({_fused_label(f)})", "fusion.test_wer_fused"),
                 (f"[{fmt(_num(f, 'test_wer_diff_ci_low'))}, {fmt(_num(f, 'test_wer_diff_ci_high'))}]",
                  f"95% interval, fused − ASR-only ({f.get('test_wer_diff_ci_level', 'utterance')}-level"
                  f"{speakers_text(f).replace(' (', ', ').rstrip(')')})", "fusion.test_wer_diff_ci"),
                 (fmt(_num(f, "test_wer_oracle")), "test WER, n-best oracle", "fusion.test_wer_oracle")]
        if _num(f, "test_wer_fused_swapped") is not None:
            kpis.append((fmt(_num(f, "test_wer_fused_swapped")), "test WER, pictures swapped (control)",
                         "fusion.test_wer_fused_swapped"))
        if _num(f, "test_wer_fused_vs_swapped_ci_low") is not None:
            kpis.append((f"[{fmt(_num(f, 'test_wer_fused_vs_swapped_ci_low'))}, "
                         f"{fmt(_num(f, 'test_wer_fused_vs_swapped_ci_high'))}]", "95% interval, fused − swapped",
                         "fusion.test_wer_fused_vs_swapped_ci"))
        if f.get("picture_verdict"):
            kpis.append((f["picture_verdict"].replace("_", " "), "picture verdict (fused against ASR-only and swapped)",
                         "fusion.picture_verdict"))
    if not missing(p):
        kpis.append((fmt(_num(p, "test_wer")), "test WER, projector + LM", "projector.test_wer"))
    if not missing(r):
        kpis.append((fmt(_num(r, "a2t_r1")), f"CLAP audio→text R@1 (zero-shot {fmt(_num(r, 'zeroshot_a2t_r1'))})",
                     "retrieval.a2t_r1"))
    if not missing(pr):
        kpis.append((fmt(_num(pr, "auc")), f"probe AUC (ECE {fmt(_num(pr, 'ece_calibrated'))} calibrated)", "probe.auc"))
    if not kpis:
        return note("No results yet: no stage after the data preparation has run.", "missing") + skipped_note(
            skipped_stages(d))
    return '<div class="kpis">' + "".join(
        f'<div class="kpi" data-metric="{esc(k)}"><b>{esc(v)}</b><span>{esc(t)}</span></div>'
        for v, t, k in kpis) + "</div>" + skipped_note(skipped_stages(d))


def render_report(d: Mapping[str, Any], info: Mapping[str, Any], root: Path, n_examples: int = 8,
                  thumb_px: int = 96, title: str = "mmasr report") -> str:
    """The whole page as one HTML string."""
    source = info.get("data_source", "")
    commit = (info["git"]["commit"] or "no git")[:10]
    body = [
        data_section(d),
        rescoring_section(d, root, n_examples, thumb_px),
        systems_section(d),
        projector_section(d, n_examples),
        clap_section(d),
        probe_section(d),
        pretrain_section(d),
        benchmarks_section(d),
        provenance_section(d, info),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in SECTIONS)
    sub = f"data source: {source} · commit {commit} · params {info['params_hash']} · written {info['generated']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n"
            f"<header><h1>{esc(title)}</h1><p>{esc(sub)}</p></header>\n<nav>{nav}</nav>\n<main>\n"
            f'<section id="summary"><h2>Key results</h2>{key_results(d)}</section>\n'
            + "\n".join(body) + "\n</main></body></html>\n")


def resolve_paths(root: Path, overrides: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Every input's path: the default layout under ``root``, with ``overrides`` (NAME -> PATH) applied."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_INPUTS))
    if unknown:
        raise ValueError(f"report: unknown input name(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_INPUTS)}")
    return {k: Path(overrides[k]) if k in overrides else Path(root) / v for k, v in DEFAULT_INPUTS.items()}


def build_report(root: Path, params: Mapping[str, Any], params_source: str = "",
                 overrides: Mapping[str, str] | None = None) -> str:
    """Read the run's outputs under ``root`` and render the report (I/O here; sections are pure)."""
    root = Path(root)
    paths = resolve_paths(root, overrides)
    d = load_inputs(paths)
    d["nbest_meta"] = parquet_metadata(paths["nbest"]) if Path(paths["nbest"]).is_file() else {}
    d["adapt_enabled"] = bool(params.get("adapt", {}).get("enabled", False))
    info = collect_provenance(d, paths, params, params_source, root)
    info["data_source"] = params.get("data", {}).get("source", "")
    cfg = params.get("report", {})
    return render_report(d, info, root, n_examples=int(cfg.get("n_examples", 8)),
                         thumb_px=int(cfg.get("thumbnail_px", 96)))
