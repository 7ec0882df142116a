"""Speaker-disjoint (and prompt-disjoint) train/dev/test splits.

Speakers, not utterances, are assigned to splits, so no voice is heard in training and test alike.
Precedence: a leave-one-speaker-out ``holdout_speaker``; else explicit speaker lists from params;
else splits given in the manifest (every row must have one: a partial ``split`` column is an error naming
the rows without one); else a seeded split stratified by group, so each split holds
impaired and control speakers whenever the data has enough of each.

With ``split.disjoint_text`` the held-out splits are prompt-disjoint from train as well: a dev/test
utterance whose normalised transcript (params ``text``) is also the transcript of a train utterance,
or whose picture (``image_id``) is also a train utterance's picture, is moved out of its split
(:func:`exclude_train_overlap`). Train keeps every utterance of its speakers; an excluded utterance is
left out of the manifest, which every later stage reads, and kept in the split report
(``results/split/excluded.parquet``, one row with its reason and the matching text or picture).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from sklearn.model_selection import train_test_split

SPLITS = ("train", "dev", "test")


def _draw(speakers: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Take ``n`` speakers out of ``speakers``, stratified by group when every group can give one."""
    if n <= 0:
        return speakers, speakers.iloc[:0]
    if n >= len(speakers):
        return speakers.iloc[:0], speakers
    counts = speakers["group"].value_counts()
    stratify = speakers["group"] if counts.min() >= 2 and n >= len(counts) and len(speakers) - n >= len(counts) else None
    rest, taken = train_test_split(speakers, test_size=n, random_state=seed, stratify=stratify)
    return rest, taken


def n_for(fraction: float, n_speakers: int, n_groups: int) -> int:
    """How many speakers a split of ``fraction`` gets: at least one per group when the fraction is
    non-zero and enough speakers remain for training, else the rounded share."""
    if fraction <= 0 or n_speakers < 3:
        return 0
    return max(round(fraction * n_speakers), min(n_groups, (n_speakers - 1) // 2))


def random_speaker_splits(speakers: pd.DataFrame, dev_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded, group-stratified speaker -> split assignment. ``speakers`` has columns speaker, group."""
    pool = speakers.sort_values("speaker").reset_index(drop=True)
    n_groups = pool["group"].nunique()
    n_test = n_for(test_fraction, len(pool), n_groups)
    n_dev = n_for(dev_fraction, len(pool), n_groups)
    if len(pool) - n_test - n_dev < 1:
        n_dev = max(0, len(pool) - n_test - 1)
    rest, test = _draw(pool, n_test, seed)
    train, dev = _draw(rest.sort_values("speaker"), n_dev, seed + 1)
    return {**{s: "train" for s in train["speaker"]}, **{s: "dev" for s in dev["speaker"]},
            **{s: "test" for s in test["speaker"]}}


def check_manifest_splits(utts: pd.DataFrame) -> None:
    """A manifest that gives splits must give one for every row: raise ValueError naming the rows without
    one (their utt_id, else their row number; the first five and how many), instead of silently drawing a
    random split for all of them."""
    missing = utts.loc[utts["split"].isna()]
    if missing.empty:
        return
    names = (missing["utt_id"].astype(str) if "utt_id" in missing else pd.Series(missing.index.astype(str))).tolist()
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ValueError(f"the manifest gives a split for {len(utts) - len(missing)} of {len(utts)} utterances; "
                     f"{len(missing)} have none ({shown}): give every row a split (train, dev or test), or none "
                     "to let split draw a speaker-disjoint one")


def assign_splits(utts: pd.DataFrame, cfg: dict, seed: int) -> pd.DataFrame:
    """Return ``utts`` with a ``split`` column filled; raise ValueError naming any conflict."""
    speakers = utts[["speaker", "group"]].drop_duplicates("speaker")
    known = set(speakers["speaker"])
    explicit = {name: list(cfg.get("speakers", {}).get(name, [])) for name in SPLITS}
    holdout = cfg.get("holdout_speaker")

    if holdout:
        if holdout not in known:
            raise ValueError(f"split.holdout_speaker '{holdout}' is not a speaker of the corpus ({len(known)} speakers)")
        rest = speakers[speakers["speaker"] != holdout]
        mapping = random_speaker_splits(rest, cfg["dev_fraction"] / max(1e-9, 1 - cfg["test_fraction"]), 0.0, seed)
        mapping[holdout] = "test"
    elif any(explicit.values()):
        mapping = {}
        for name, listed in explicit.items():
            unknown = sorted(set(listed) - known)
            if unknown:
                raise ValueError(f"split.speakers.{name} names unknown speaker(s): {', '.join(unknown)}")
            for spk in listed:
                if spk in mapping:
                    raise ValueError(f"speaker '{spk}' is listed in split.speakers.{mapping[spk]} and .{name}")
                mapping[spk] = name
        mapping.update({spk: "train" for spk in known if spk not in mapping})
    elif "split" in utts and utts["split"].notna().any():
        check_manifest_splits(utts)
        per_speaker = utts.groupby("speaker")["split"].unique()
        mixed = per_speaker[per_speaker.map(len) > 1]
        if len(mixed):
            spk = mixed.index[0]
            raise ValueError(f"manifest puts speaker '{spk}' in several splits ({', '.join(sorted(mixed[spk]))}); "
                             "splits must be speaker-disjoint")
        mapping = {spk: splits[0] for spk, splits in per_speaker.items()}
    else:
        mapping = random_speaker_splits(speakers, cfg["dev_fraction"], cfg["test_fraction"], seed)

    out = utts.copy()
    out["split"] = out["speaker"].map(mapping).astype("string")
    return out


def split_summary(manifest: pd.DataFrame) -> dict:
    """Speakers and utterances per split and group (results/metrics/split.json)."""
    summary: dict = {}
    for name in SPLITS:
        part = manifest[manifest["split"] == name]
        summary[f"{name}_speakers"] = sorted(part["speaker"].unique().tolist())
        summary[f"{name}_n_utts"] = int(len(part))
        summary[f"{name}_hours"] = round(float(part["duration_s"].sum()) / 3600, 6)
        for group, n in part.drop_duplicates("speaker")["group"].value_counts().sort_index().items():
            summary[f"{name}_n_speakers_{group}"] = int(n)
    return summary


EXCLUDED_COLUMNS = ["utt_id", "speaker", "group", "split", "reason", "match"]
REASONS = ("text_in_train", "image_in_train")
HELD_OUT = ("dev", "test")


def _texts(manifest: pd.DataFrame, norm: Callable[[str], str]) -> pd.Series:
    """Each utterance's normalised transcript ("" where it has none)."""
    if "text" not in manifest:
        return pd.Series("", index=manifest.index, dtype=object)
    return manifest["text"].map(lambda t: norm(str(t)) if isinstance(t, str) else "")


def _images(manifest: pd.DataFrame) -> pd.Series:
    """Each utterance's picture id (None where it has none)."""
    if "image_id" not in manifest:
        return pd.Series(None, index=manifest.index, dtype=object)
    return manifest["image_id"].map(lambda i: str(i) if isinstance(i, str) and i else None)


def overlap_masks(manifest: pd.DataFrame, norm: Callable[[str], str]
                  ) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    """(texts, images, text_hit, image_hit): each utterance's normalised transcript and picture, and whether
    it is a dev/test utterance whose transcript (resp. picture) is also a train utterance's. Empty
    transcripts and utterances without a picture never match."""
    texts, images = _texts(manifest, norm), _images(manifest)
    train = manifest["split"] == "train"
    held = manifest["split"].isin(HELD_OUT)
    text_hit = held & texts.isin(set(texts[train]) - {""})
    image_hit = held & images.isin(set(images[train].dropna()))
    return texts, images, text_hit, image_hit


def train_overlap(manifest: pd.DataFrame, norm: Callable[[str], str]) -> pd.DataFrame:
    """The dev/test utterances of a split manifest whose normalised transcript or picture also occurs in
    train, as rows of :data:`EXCLUDED_COLUMNS` (index: the manifest's). The reason is ``text_in_train``
    when the transcript matches (``match``: the normalised transcript), else ``image_in_train``
    (``match``: the image_id)."""
    texts, images, text_hit, image_hit = overlap_masks(manifest, norm)
    rows = manifest.loc[text_hit | image_hit]
    by_text = text_hit[rows.index]
    out = pd.DataFrame({
        "utt_id": rows["utt_id"].astype(str) if "utt_id" in rows else rows.index.astype(str),
        "speaker": rows["speaker"].astype(str),
        "group": rows["group"] if "group" in rows else None,
        "split": rows["split"].astype(str),
        "reason": by_text.map({True: "text_in_train", False: "image_in_train"}),
        "match": texts[rows.index].where(by_text, images[rows.index]),
    }, index=rows.index, columns=EXCLUDED_COLUMNS)
    return out.astype("string")


def empty_excluded() -> pd.DataFrame:
    """The split report of a run that excludes nothing: no rows, the right columns."""
    return pd.DataFrame({c: pd.Series(dtype="string") for c in EXCLUDED_COLUMNS})


def check_held_out(before: pd.DataFrame, after: pd.DataFrame, excluded: pd.DataFrame) -> None:
    """Raise ValueError when excluding ``excluded`` emptied dev or test, or left a group that had test
    utterances with none (fusion tunes on dev and reports on test; the probe needs both classes in test)."""
    remedy = ("use a corpus whose dev/test prompts (and pictures) are held out of the train speakers' prompts, "
              "or set split.disjoint_text: false")

    def why(part: pd.DataFrame) -> str:
        counts = part["reason"].value_counts()
        return ", ".join(f"{int(counts[r])} {r}" for r in REASONS if r in counts)

    for name in HELD_OUT:
        had, has = before[before["split"] == name], after[after["split"] == name]
        if len(had) and not len(has):
            reasons = why(excluded[excluded["split"] == name])
            raise ValueError(f"split.disjoint_text leaves the {name} split empty: all {len(had)} {name} utterances "
                             f"share a normalised transcript or picture with train ({reasons}); {remedy}")
    if "group" in before:
        had = before[before["split"] == "test"]
        has = set(after.loc[after["split"] == "test", "group"].dropna())
        for group in sorted(set(had["group"].dropna()) - has):
            lost = excluded[(excluded["split"] == "test") & (excluded["group"] == group)]
            raise ValueError(f"split.disjoint_text leaves no test utterance of group '{group}': all "
                             f"{int((had['group'] == group).sum())} of them share a normalised transcript or picture "
                             f"with train ({why(lost)}); {remedy}")


def make_splits(utts: pd.DataFrame, cfg: dict, norm: Callable[[str], str], seed: int
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, excluded): speaker-disjoint splits (:func:`assign_splits`), then, with
    ``cfg["disjoint_text"]``, the dev/test utterances that overlap train moved out of the manifest into
    ``excluded``. Without it the manifest is :func:`assign_splits`' and ``excluded`` is empty."""
    if not cfg.get("disjoint_text", False):
        return assign_splits(utts, cfg, seed), empty_excluded()
    manifest = assign_splits(utts.reset_index(drop=True), cfg, seed)
    overlap = train_overlap(manifest, norm)
    kept = manifest.drop(index=overlap.index)
    check_held_out(manifest, kept, overlap)
    return kept.reset_index(drop=True), overlap.reset_index(drop=True)


def exclusion_summary(manifest: pd.DataFrame, excluded: pd.DataFrame, norm: Callable[[str], str],
                      disjoint_text: bool) -> dict:
    """split.json's exclusion keys: what was moved out, per reason and split, and how many dev/test
    utterances of the manifest share a transcript (``*_n_text_in_train``) or, counted on its own, a
    picture (``*_n_image_in_train``) with train: 0 with disjoint_text, the overlap to discount without it."""
    out: dict = {"disjoint_text": bool(disjoint_text), "n_excluded": int(len(excluded))}
    short = {"text_in_train": "text_overlap", "image_in_train": "image_overlap"}
    for reason in REASONS:
        out[f"n_excluded_{short[reason]}"] = int((excluded["reason"] == reason).sum())
    for name in HELD_OUT:
        part = excluded[excluded["split"] == name]
        out[f"{name}_n_excluded"] = int(len(part))
        for reason in REASONS:
            out[f"{name}_n_excluded_{short[reason]}"] = int((part["reason"] == reason).sum())
    _, _, text_hit, image_hit = overlap_masks(manifest, norm)
    for name in HELD_OUT:
        part = manifest["split"] == name
        out[f"{name}_n_text_in_train"] = int((text_hit & part).sum())
        out[f"{name}_n_image_in_train"] = int((image_hit & part).sum())
    return out
