"""``mmasr transcribe``: one audio file, any format and rate, optionally rescored with its picture."""

from __future__ import annotations

import json
import logging
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from mmasr.rescoring.fusion import fuse, log_linear_scores, masked_softmax
from mmasr.models.loading import clip_image_embeddings, clip_text_embeddings, load_from_params
from mmasr.rescoring.nbest import nbest_for_batch
from mmasr.data.preprocess import Rejected, load_and_clean
from mmasr.data.text import clip_texts, normaliser

log = logging.getLogger(__name__)
UNTUNED_ALPHA = 0.3  # seed 000's default, used only when no tuned alpha exists


def tuned_alpha(fusion_metrics: str | Path | None) -> float | None:
    path = Path(fusion_metrics) if fusion_metrics else None
    if path and path.is_file():
        return float(json.loads(path.read_text())["best_alpha"])
    return None


def tuned_log_linear(fusion_metrics: str | Path | None) -> dict | None:
    """The dev-chosen log-linear ASR+CLIP weights (lambda_clip, beta) of a fusion.json whose headline form is
    log_linear, else None (then the seed form's alpha is used)."""
    path = Path(fusion_metrics) if fusion_metrics else None
    if path and path.is_file():
        m = json.loads(path.read_text())
        if m.get("fusion_form") == "log_linear":
            return m.get("weights_fused_log_linear_form")
    return None


def picture_embedding(clip_bundle, image: str | Path | None, image_id: str | None,
                      embeddings: str | Path | None) -> tuple[np.ndarray | None, str | None]:
    """The picture's CLIP embedding and, when there is none, why (the warning to show)."""
    if image is not None:
        path = Path(image)
        if not path.is_file():
            return None, f"picture {path} not found: ASR-only"
        try:
            with Image.open(path) as img:
                return clip_image_embeddings(clip_bundle, [img.convert("RGB")])[0], None
        except OSError as exc:
            return None, f"picture {path} unreadable ({exc}): ASR-only"
    if image_id is not None:
        from mmasr.rescoring.clip import load_embeddings

        if embeddings is None or not Path(embeddings).is_file():
            return None, f"no embedding cache at {embeddings}: ASR-only"
        cache = load_embeddings(embeddings)
        if image_id not in cache:
            return None, f"picture id {image_id!r} is not in {embeddings}: ASR-only"
        return cache[image_id], None
    return None, "no picture given: ASR-only"


def _rescore(hyps: list[dict], p: dict, clip_bundle, vec: np.ndarray | None, alpha: float | None,
             log_linear: dict | None) -> dict:
    """One stretch of audio's n-best: ASR-only without a picture vector; else fused in the log-linear form with
    ``log_linear``'s weights (lambda_clip, beta) when given, or in the seed form at ``alpha``."""
    asr = np.array([[h["asr_score"] for h in hyps]])
    valid = np.ones_like(asr, bool)
    p_asr = masked_softmax(asr, valid)[0]
    if vec is None or not hyps:
        return {"transcription": hyps[0]["text"] if hyps else "",
                "hypotheses": [{"text": h["text"], "asr_score": h["asr_score"], "asr_prob": float(q)}
                               for h, q in zip(hyps, p_asr)]}
    texts = clip_texts([h["text"] for h in hyps], p["text"])
    cos = clip_text_embeddings(clip_bundle, texts) @ vec
    tau = p["fusion"]["tau"]
    if log_linear is None:  # the seed form: (1 - alpha) softmax(asr_score) + alpha softmax(tau cos)
        fused = fuse(asr, cos[None, :], valid, np.array([alpha]), tau)[0, 0]
    else:  # the log-linear form with the dev-chosen ASR+CLIP weights: sum_logprob + lambda_clip tau cos + beta n_tokens
        total = np.array([[h["sum_logprob"] for h in hyps]])
        length = np.array([[h["n_tokens"] for h in hyps]], np.float64)
        weights = np.array([[log_linear["lambda_clip"], 0.0, log_linear["beta"]]])
        fused = log_linear_scores(total, cos[None, :], np.full_like(total, np.nan), length, valid, weights, tau)[0, 0]
    p_clip = masked_softmax(tau * cos[None, :], valid)[0]
    order = np.argsort(-fused, kind="stable")
    return {"transcription": hyps[order[0]]["text"],
            "hypotheses": [{"text": hyps[i]["text"], "asr_score": hyps[i]["asr_score"],
                            "sum_logprob": hyps[i]["sum_logprob"], "n_tokens": hyps[i]["n_tokens"],
                            "asr_prob": float(p_asr[i]), "clip_score": float(cos[i]), "clip_prob": float(p_clip[i]),
                            "fused_score": float(fused[i])}
                           for i in order]}


def load_long(audio: str | Path, cfg: dict) -> np.ndarray:
    """The whole recording, decoded, mono, resampled and peak-normalised as ``preprocess`` does, but neither
    trimmed (segment times count from the file's first sample) nor bounded by ``max_duration_s`` (only by
    ``max_input_duration_s``)."""
    untrimmed = {**cfg, "trim_db": math.inf, "min_duration_s": 0.0, "max_duration_s": math.inf}
    try:
        return load_and_clean(audio, untrimmed).audio
    except Rejected as exc:
        raise ValueError(f"cannot transcribe {audio}: {exc.reason}: {exc.detail}") from None


def header_duration(audio: str | Path) -> float:
    """The file's length in seconds from its header (0 when it cannot be read: decoding then says why)."""
    try:
        info = sf.info(str(audio))
    except Exception:  # libsndfile's errors share no type; load_and_clean reports them with the reason
        return 0.0
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


def transcribe(audio: str | Path, p: dict, image=None, image_id=None, alpha: float | None = None,
               embeddings=None, fusion_metrics=None) -> dict:
    """Seed 000's ``transcribe``: n-best from Whisper, fused with CLIP when a picture is available: in the headline
    form of ``fusion_metrics`` (log-linear with its dev-chosen lambda_clip and beta, or the seed form with its alpha);
    an explicit ``alpha`` means the seed form.

    A recording longer than ``transcribe.long_after_s`` (Whisper's 30 s window) is cut into speech segments
    by Silero VAD; each is transcribed and rescored with the same picture, the transcriptions are joined
    with spaces, and ``segments`` lists each one's ``start``/``end`` (seconds from the file's start), its
    transcription and hypotheses."""
    sr = p["preprocess"]["sample_rate"]
    long_file = header_duration(audio) > p["transcribe"]["long_after_s"]
    if long_file:
        from mmasr.rescoring.vad import speech_segments

        full = load_long(audio, p["preprocess"])
        spans = speech_segments(full, sr, p["transcribe"])
        pieces = [full[int(round(a * sr)):int(round(b * sr))] for a, b in spans]
    else:
        try:
            pieces = [load_and_clean(audio, p["preprocess"]).audio]
        except Rejected as exc:
            raise ValueError(f"cannot transcribe {audio}: {exc.reason}: {exc.detail}") from None
    whisper = load_from_params("whisper", p["models"])
    step, norm = p["nbest"]["batch_size"], normaliser(p["text"])
    nbests = [hyps for i in range(0, len(pieces), step)  # nbest.batch_size segments per beam search
              for hyps in nbest_for_batch(whisper, pieces[i:i + step], p["nbest"], norm)]
    result: dict = {"audio": str(audio), "whisper": whisper.name}

    vec, warning, clip_bundle = None, None, None
    if image is not None or image_id is not None:
        clip_bundle = load_from_params("clip", p["models"])
        vec, warning = picture_embedding(clip_bundle, image, image_id, embeddings)
    else:
        warning = "no picture given: ASR-only"
    if vec is None:
        log.warning("%s", warning)
        result.update(mode="asr_only", warning=warning)
    log_linear = None
    if vec is not None:
        log_linear = tuned_log_linear(fusion_metrics) if alpha is None else None
        if log_linear is not None:
            result.update(form="log_linear", lambda_clip=log_linear["lambda_clip"], beta=log_linear["beta"])
        else:
            if alpha is None:
                alpha = tuned_alpha(fusion_metrics)
                if alpha is None:
                    alpha = UNTUNED_ALPHA
                    result["warning"] = f"no tuned alpha at {fusion_metrics}; using {UNTUNED_ALPHA}"
            result.update(form="seed", alpha=alpha)
        result.update(mode="multimodal", tau=p["fusion"]["tau"], clip=clip_bundle.name)
    scored = [_rescore(hyps, p, clip_bundle, vec, alpha, log_linear) for hyps in nbests]
    if not long_file:
        result.update(scored[0])
        return result
    segments = [{"start": round(a, 3), "end": round(b, 3), **one} for (a, b), one in zip(spans, scored)]
    result.update(transcription=" ".join(s["transcription"] for s in segments if s["transcription"]),
                  duration_s=round(len(full) / sr, 3), segments=segments,
                  vad={"model": f"silero-vad {version('silero-vad')}", **p["transcribe"]})
    if not segments:
        result["warning"] = (result.get("warning", "") + "; " if result.get("warning") else "") + \
            "Silero VAD found no speech"
    return result

