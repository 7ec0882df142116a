"""Test WER apart for utterances whose picture train also shows and those whose picture it does not.

Picture-description corpora show every speaker the same few pictures, so by default (``split.disjoint_picture:
false``) test utterances describe pictures the models saw described in train. fusion.json then reports the
pooled WER of each system on the two parts separately, whenever both are non-empty, so a gain that only holds
for seen pictures shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mmasr.metrics.wer import pooled_wer

__all__ = ["picture_seen_mask", "picture_overlap_metrics"]


def picture_seen_mask(meta: pd.DataFrame, utt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(seen, unseen) boolean masks over ``utt_ids``: the utterance has a picture that a train utterance of
    ``meta`` (indexed by utt_id, with split and image_id) also has, or a picture no train utterance has.
    Utterances without a picture are in neither."""
    images = meta["image_id"] if "image_id" in meta else pd.Series(None, index=meta.index, dtype=object)
    train_images = set(images[meta["split"] == "train"].dropna().astype(str))
    ids = images.reindex(list(utt_ids))
    has = ids.notna().to_numpy()
    seen = has & ids.astype(str).isin(train_images).to_numpy()
    return seen, has & ~seen


def picture_overlap_metrics(meta: pd.DataFrame, utt_ids: Sequence[str], errors: Mapping[str, np.ndarray],
                            ref_words: np.ndarray) -> dict:
    """fusion.json's keys: ``test_n_picture_in_train`` / ``test_n_picture_not_in_train`` always, and, when both
    are non-zero, ``test_wer_<system>_picture_in_train`` / ``_picture_not_in_train`` for each system's
    per-utterance errors in ``errors`` (aligned with ``utt_ids`` and ``ref_words``)."""
    seen, unseen = picture_seen_mask(meta, utt_ids)
    out: dict = {"test_n_picture_in_train": int(seen.sum()), "test_n_picture_not_in_train": int(unseen.sum())}
    if seen.any() and unseen.any():
        ref_words = np.asarray(ref_words)
        for name, err in errors.items():
            err = np.asarray(err)
            out[f"test_wer_{name}_picture_in_train"] = pooled_wer(err[seen], ref_words[seen])
            out[f"test_wer_{name}_picture_not_in_train"] = pooled_wer(err[unseen], ref_words[unseen])
    return out
