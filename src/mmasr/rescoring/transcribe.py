"""``mmasr transcribe``: one audio file, any format and rate, optionally rescored with its picture."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
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


def transcribe(audio: str | Path, p: dict, image=None, image_id=None, alpha: float | None = None,
               embeddings=None, fusion_metrics=None) -> dict:
    """Seed 000's ``transcribe``: n-best from Whisper, fused with CLIP when a picture is available: in the headline
    form of ``fusion_metrics`` (log-linear with its dev-chosen lambda_clip and beta, or the seed form with its alpha);
    an explicit ``alpha`` means the seed form."""
    try:
        cleaned = load_and_clean(audio, p["preprocess"]).audio
    except Rejected as exc:
        raise ValueError(f"cannot transcribe {audio}: {exc.reason}: {exc.detail}") from None
    whisper = load_from_params("whisper", p["models"])
    hyps = nbest_for_batch(whisper, [cleaned], p["nbest"], normaliser(p["text"]))[0]
    result: dict = {"audio": str(audio), "whisper": whisper.name}
    asr = np.array([[h["asr_score"] for h in hyps]])
    valid = np.ones_like(asr, bool)
    p_asr = masked_softmax(asr, valid)[0]

    vec, warning = None, None
    if image is not None or image_id is not None:
        clip_bundle = load_from_params("clip", p["models"])
        vec, warning = picture_embedding(clip_bundle, image, image_id, embeddings)
    else:
        warning = "no picture given: ASR-only"
    if vec is None:
        log.warning("%s", warning)
        result.update(mode="asr_only", warning=warning, transcription=hyps[0]["text"] if hyps else "",
                      hypotheses=[{"text": h["text"], "asr_score": h["asr_score"], "asr_prob": float(q)}
                                  for h, q in zip(hyps, p_asr)])
        return result

    log_linear = tuned_log_linear(fusion_metrics) if alpha is None else None
    if alpha is None and log_linear is None:
        alpha = tuned_alpha(fusion_metrics)
        if alpha is None:
            alpha = UNTUNED_ALPHA
            result["warning"] = f"no tuned alpha at {fusion_metrics}; using {UNTUNED_ALPHA}"
    texts = clip_texts([h["text"] for h in hyps], p["text"])
    cos = clip_text_embeddings(clip_bundle, texts) @ vec
    tau = p["fusion"]["tau"]
    if log_linear is None:  # the seed form: (1 - alpha) softmax(asr_score) + alpha softmax(tau cos)
        fused = fuse(asr, cos[None, :], valid, np.array([alpha]), tau)[0, 0]
        result.update(form="seed", alpha=alpha)
    else:  # the log-linear form with the dev-chosen ASR+CLIP weights: sum_logprob + lambda_clip tau cos + beta n_tokens
        total = np.array([[h["sum_logprob"] for h in hyps]])
        length = np.array([[h["n_tokens"] for h in hyps]], np.float64)
        weights = np.array([[log_linear["lambda_clip"], 0.0, log_linear["beta"]]])
        fused = log_linear_scores(total, cos[None, :], np.full_like(total, np.nan), length, valid, weights, tau)[0, 0]
        result.update(form="log_linear", lambda_clip=log_linear["lambda_clip"], beta=log_linear["beta"])
    p_clip = masked_softmax(tau * cos[None, :], valid)[0]
    order = np.argsort(-fused, kind="stable")
    result.update(mode="multimodal", tau=tau, clip=clip_bundle.name,
                  transcription=hyps[order[0]]["text"],
                  hypotheses=[{"text": hyps[i]["text"], "asr_score": hyps[i]["asr_score"],
                               "sum_logprob": hyps[i]["sum_logprob"], "n_tokens": hyps[i]["n_tokens"],
                               "asr_prob": float(p_asr[i]),
                               "clip_score": float(cos[i]), "clip_prob": float(p_clip[i]), "fused_score": float(fused[i])}
                              for i in order])
    return result
