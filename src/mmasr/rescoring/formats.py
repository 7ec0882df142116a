"""Scores out in the field's formats (``mmasr score-formats``, rule ``scoring``): NIST sclite ``trn`` files,
a per-speaker and per-group S/D/I table from the project's own (jiwer) alignments, sclite's own report
when SCTK is installed, and the n-best lists as HyPoradise-style JSON.

Everything is written from the same normalised text the project scores (``text`` params), so sclite's
totals on the trn files are the project's totals (checked here whenever sclite runs, and in the tests).

trn ids are ``(<speaker code>-<utterance>)``, as ``sclite -i rm`` reads them: the speaker code is the
speaker's letters and digits, lower-cased (sclite folds case), with no ``-`` or ``_``; two speakers that
would get the same code (or one with no letter or digit) get a numbered code instead. ``ids.tsv`` maps
every trn id back to its utterance id and speaker, so the mapping is reversible.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from mmasr.data.text import normaliser
from mmasr.io import atomic_dir
from mmasr.metrics.wer import group_wer_table
from mmasr.rescoring.fusion import NBest, fixed_alpha_choice, headline_fused_choice, take, to_arrays

__all__ = ["speaker_codes", "trn_ids", "trn_lines", "sdi_table", "hyporadise_items", "find_sclite",
           "parse_sclite_raw", "run_sclite", "write_scoring", "SYSTEMS"]

SYSTEMS = ("asr", "fused")  # Whisper's own best hypothesis; the picture-fused pick (headline form, dev-chosen weights)
SCLITE_DIRS = ("/usr/lib/sctk/bin",)  # where Debian's package sctk puts sclite (its /usr/bin/sctk is a wrapper)
_NOT_CODE = re.compile(r"[^a-z0-9]+")
_NOT_UTT = re.compile(r"[^A-Za-z0-9._-]+")


def speaker_codes(speakers) -> dict[str, str]:
    """Speaker -> a code sclite's ``-i rm`` reads as one speaker: lower-case letters and digits only.

    Codes are unique without case; a speaker whose code is empty or already taken (``F-01`` and ``f01``)
    gets ``<code>x<n>`` (or ``spk<n>``) with the first free n. Speakers are taken in sorted order, so the
    mapping does not depend on row order."""
    codes: dict[str, str] = {}
    used: set[str] = set()
    for speaker in sorted({str(s) for s in speakers}):
        base = _NOT_CODE.sub("", speaker.lower())
        code, n = base, 1
        while not code or code in used:
            code = f"{base}x{n}" if base else f"spk{n}"
            n += 1
        codes[speaker] = code
        used.add(code)
    return codes


def trn_ids(utt_ids, speakers, codes: dict[str, str]) -> list[str]:
    """Each utterance's trn id ``<code>-<utt>``: the utterance id with characters sclite could misread
    (spaces, parentheses, anything but letters, digits, ``.``, ``_``, ``-``) replaced by ``.`` and then a
    short hash of the utterance id, so changed ids cannot meet (sclite compares ids without case: an id
    that differs from an earlier one only in case gets the hash too)."""
    out, seen = [], set()
    for utt, spk in zip(utt_ids, speakers):
        utt = str(utt)
        safe = _NOT_UTT.sub(".", utt).strip(".") or "utt"
        trn = f"{codes[str(spk)]}-{safe}"
        if trn.lower() in seen or safe != utt:
            trn += "." + hashlib.sha1(utt.encode()).hexdigest()[:8]
        if trn.lower() in seen:
            raise ValueError(f"utterance id {utt!r} gives trn id {trn} twice (are utterance ids unique?)")
        seen.add(trn.lower())
        out.append(trn)
    return out


def trn_lines(texts, ids) -> str:
    """A trn file: one ``words ... (id)`` line per utterance (an empty text is a line with only the id)."""
    lines = []
    for text, id_ in zip(texts, ids):
        words = " ".join(str(text).split())
        if "(" in words or ")" in words:
            raise ValueError(f"{id_}: text {words!r} holds a parenthesis, which sclite reads as an id; "
                             f"score with text.remove_punctuation: true")
        lines.append(f"{words} ({id_})" if words else f"({id_})")
    return "\n".join(lines) + "\n"


def sdi_table(meta: pd.DataFrame, nb: NBest, pick: np.ndarray, split: str, system: str) -> list[dict]:
    """Substitutions, deletions, insertions, errors and pooled WER of one system on one split: over all
    utterances, per group and per speaker (``level`` all / group / speaker), from the n-best's alignments."""
    labels = meta.assign(all="all")[["all", "group", "speaker"]].astype(str)
    sub, dele, ins = take(nb.sub, pick), take(nb.dele, pick), take(nb.ins, pick)
    rows = group_wer_table(labels, nb.ref_words, {"wer": sub + dele + ins},
                           {"S": sub, "D": dele, "I": ins, "errors": sub + dele + ins}, levels=("all", "group", "speaker"))
    return [{"split": split, "system": system, **r} for r in rows]


def hyporadise_items(nb: NBest, references: list[str]) -> list[dict]:
    """HyPoradise-style records: ``{"input": [distinct normalised hypotheses, Whisper's rank order],
    "output": normalised reference}`` per utterance, plus its ``utt_id``."""
    items = []
    for u, utt in enumerate(nb.utt_ids):
        hyps = list(dict.fromkeys(t for t, ok in zip(nb.texts[u], nb.valid[u]) if ok))
        items.append({"utt_id": str(utt), "input": hyps, "output": references[u]})
    return items


def find_sclite() -> str | None:
    """The sclite executable: on PATH, else where Debian's ``sctk`` package installs it; None if absent."""
    found = shutil.which("sclite")
    if found:
        return found
    for folder in SCLITE_DIRS:
        path = Path(folder) / "sclite"
        if path.is_file() and path.stat().st_mode & 0o111:
            return str(path)
    return None


_SUM_LINE = re.compile(r"^\s*\|\s*Sum\s*\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|")


def parse_sclite_raw(text: str) -> dict:
    """Totals from sclite's ``rsum`` (raw counts) report: sentences, reference words, correct, S, D, I,
    errors, sentence errors."""
    for line in text.splitlines():
        m = _SUM_LINE.match(line)
        if m:
            keys = ("n_sent", "ref_words", "correct", "S", "D", "I", "errors", "sentence_errors")
            return dict(zip(keys, map(int, m.groups())))
    raise ValueError("no 'Sum' line in sclite's raw summary")


def run_sclite(sclite: str, ref: Path, hyp: Path, out_dir: Path, name: str) -> dict:
    """Run ``sclite -i rm`` on two trn files; write ``<name>.sys`` (per-speaker percentages) and
    ``<name>.raw`` (counts) into ``out_dir``; return the raw totals."""
    cmd = [sclite, "-r", str(ref), "trn", "-h", str(hyp), "trn", "-i", "rm", "-o", "sum", "rsum", "-O", str(out_dir),
           "-n", name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    raw = out_dir / f"{name}.raw"
    if done.returncode != 0 or not raw.is_file():
        raise RuntimeError(f"sclite failed on {hyp} (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    return parse_sclite_raw(raw.read_text(errors="replace"))


def write_scoring(nbest: pd.DataFrame, manifest: pd.DataFrame, fusion_metrics: dict, text_cfg: dict,
                  out_dir: str | Path, splits=("dev", "test"), sclite: str | None = None) -> dict:
    """Write ``out_dir`` (replaced whole) and return the summary metrics.

    ``out_dir``: ``ids.tsv``; ``<split>/ref.trn``, ``<split>/asr.trn``, ``<split>/fused.trn``; ``sdi.tsv``;
    ``hyporadise/<split>.json``; with ``sclite``, ``sclite/<split>_<system>.sys`` and ``.raw``. The fused
    pick is recomputed in the fusion stage's headline form at its dev-chosen weights and must give its WERs."""
    meta = manifest.set_index("utt_id")
    alpha, tau = float(fusion_metrics["best_alpha"]), float(fusion_metrics["tau"])
    norm = normaliser(text_cfg)
    codes = speaker_codes(meta["speaker"].astype(str))
    summary: dict = {"fusion_form": fusion_metrics.get("fusion_form", "seed"), "best_alpha": alpha, "sclite": sclite,
                     "splits": {}, "n_speakers": len(codes)}
    id_rows, sdi_rows = [], []
    with atomic_dir(out_dir) as tmp:
        for split in splits:
            part = nbest[nbest["utt_id"].isin(meta.index[meta["split"] == split])]
            if part.empty:
                continue
            nb = to_arrays(part, meta["text"], text_cfg)
            split_meta = meta.loc[nb.utt_ids]
            speakers = split_meta["speaker"].astype(str).to_numpy()
            ids = trn_ids(nb.utt_ids, speakers, codes)
            refs = [norm(str(t)) for t in split_meta["text"]]
            picks = {"asr": fixed_alpha_choice(nb, 0.0, tau), "fused": headline_fused_choice(nb, fusion_metrics, tau)}
            folder = tmp / split
            folder.mkdir()
            (folder / "ref.trn").write_text(trn_lines(refs, ids))
            info = {"n_utts": len(ids), "ref_words": int(nb.ref_words.sum())}
            for system, pick in picks.items():
                (folder / f"{system}.trn").write_text(trn_lines(take(nb.texts, pick), ids))
                rows = sdi_table(split_meta.reset_index(), nb, pick, split, system)
                sdi_rows += rows
                total = rows[0]
                info[system] = {k: total[k] for k in ("S", "D", "I", "errors", "wer")}
            want = fusion_metrics.get(f"{split}_wer_fused")
            if want is not None and not np.isclose(info["fused"]["wer"], want, rtol=0, atol=1e-9):
                raise ValueError(f"the fused pick recomputed in the {fusion_metrics.get('fusion_form', 'seed')} form gives {split} WER {info['fused']['wer']:.6f}, "
                                 f"the fusion stage reported {want:.6f}: fusion.json and the n-best table disagree")
            id_rows += [{"trn_id": i, "utt_id": str(u), "speaker": s, "speaker_code": codes[s],
                         "group": str(g), "split": split}
                        for i, u, s, g in zip(ids, nb.utt_ids, speakers, split_meta["group"])]
            (tmp / "hyporadise").mkdir(exist_ok=True)
            (tmp / "hyporadise" / f"{split}.json").write_text(
                json.dumps(hyporadise_items(nb, refs), indent=1, ensure_ascii=False) + "\n")
            if sclite:
                (tmp / "sclite").mkdir(exist_ok=True)
                for system in SYSTEMS:
                    got = run_sclite(sclite, folder / "ref.trn", folder / f"{system}.trn", tmp / "sclite",
                                     f"{split}_{system}")
                    ours = info[system]
                    info[system]["sclite"] = got
                    info[system]["sclite_agrees"] = (got["errors"] == ours["errors"]
                                                     and got["ref_words"] == info["ref_words"])
            summary["splits"][split] = info
        pd.DataFrame(id_rows).to_csv(tmp / "ids.tsv", sep="\t", index=False)
        pd.DataFrame(sdi_rows).to_csv(tmp / "sdi.tsv", sep="\t", index=False, float_format="%.6f")
    summary["sclite_agrees"] = (None if not sclite else
                                all(v[s]["sclite_agrees"] for v in summary["splits"].values() for s in SYSTEMS))
    return summary

