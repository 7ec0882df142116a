"""Speaker-disjoint (and prompt-disjoint) train/dev/test splits.

Speakers, not utterances, are assigned to splits, so no voice is heard in training and test alike.
Precedence: a leave-one-speaker-out ``holdout_speaker``; else explicit speaker lists from params;
else splits given in the manifest (every row must have one: a partial ``split`` column is an error naming
the rows without one); else a seeded split stratified by group, so each split holds
impaired and control speakers whenever the data has enough of each.

Two overlap policies, applied after the speaker split (:func:`make_splits`):

- ``split.disjoint_text`` (transcripts; on by default). ``true``: a dev/test utterance whose normalised
  transcript (params ``text``) is also the transcript of a train utterance is moved out of its split
  (reason ``text_in_train``); train keeps every utterance of its speakers. ``partition``: the prompts
  themselves are partitioned (:func:`partition_prompts`): held-out prompts leave the train speakers'
  utterances too (reason ``text_held_out``) and train prompts leave dev/test (``text_in_train``), so a
  read-speech corpus in which everyone reads the same list (TORGO) is both speaker- and prompt-disjoint.
- ``split.disjoint_picture`` (off by default): a dev/test utterance whose picture (``image_id``) is also a
  train utterance's picture is moved out too (``image_in_train``). Picture-description tasks show every
  speaker the same few pictures by design, so this is off; the picture overlap is always counted in
  split.json (``*_n_image_in_train``) and fusion reports test WER for seen and unseen pictures apart.

An excluded utterance is left out of the manifest, which every later stage reads, and kept in the split
report (``results/split/excluded.parquet``, one row with its reason and the matching text or picture).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
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
REASONS = ("text_in_train", "image_in_train", "text_held_out")
SHORT = {"text_in_train": "text_overlap", "image_in_train": "image_overlap", "text_held_out": "text_held_out"}
HELD_OUT = ("dev", "test")
TEXT_POLICIES = (True, False, "partition")


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


def _excluded_rows(manifest: pd.DataFrame, mask: pd.Series, reason: str, match: pd.Series) -> pd.DataFrame:
    rows = manifest.loc[mask]
    return pd.DataFrame({
        "utt_id": rows["utt_id"].astype(str) if "utt_id" in rows else rows.index.astype(str),
        "speaker": rows["speaker"].astype(str),
        "group": rows["group"] if "group" in rows else None,
        "split": rows["split"].astype(str),
        "reason": reason,
        "match": match[rows.index],
    }, index=rows.index, columns=EXCLUDED_COLUMNS).astype("string")


def train_overlap(manifest: pd.DataFrame, norm: Callable[[str], str], text: bool = True, picture: bool = True
                  ) -> pd.DataFrame:
    """The dev/test utterances of a split manifest whose normalised transcript (with ``text``) or picture
    (with ``picture``) also occurs in train, as rows of :data:`EXCLUDED_COLUMNS` (index: the manifest's).
    The reason is ``text_in_train`` when the transcript matches (``match``: the normalised transcript),
    else ``image_in_train`` (``match``: the image_id)."""
    texts, images, text_hit, image_hit = overlap_masks(manifest, norm)
    text_hit = text_hit & text
    image_hit = image_hit & picture & ~text_hit
    return pd.concat([_excluded_rows(manifest, text_hit, "text_in_train", texts),
                      _excluded_rows(manifest, image_hit, "image_in_train", images)]).sort_index()


def partition_prompts(manifest: pd.DataFrame, texts: pd.Series, held_fraction: float, seed: int) -> set[str]:
    """The held-out prompts of a prompt partition: every normalised prompt only dev/test speakers read, and a
    seeded share ``held_fraction`` (at least one) of the prompts both train and dev/test speakers read."""
    train = set(texts[manifest["split"] == "train"]) - {""}
    held = set(texts[manifest["split"].isin(HELD_OUT)]) - {""}
    shared = sorted(train & held)
    n = min(len(shared), max(1, round(held_fraction * len(shared)))) if shared else 0
    pick = np.random.default_rng([seed, 2411]).permutation(len(shared))[:n]
    return (held - train) | {shared[i] for i in pick}


def prompt_partition_overlap(manifest: pd.DataFrame, norm: Callable[[str], str], held_fraction: float, seed: int
                             ) -> tuple[pd.DataFrame, set[str]]:
    """(excluded rows, held-out prompts) of ``split.disjoint_text: partition``: train utterances of a held-out
    prompt (``text_held_out``) and dev/test utterances of a train prompt (``text_in_train``)."""
    texts = _texts(manifest, norm)
    held_prompts = partition_prompts(manifest, texts, held_fraction, seed)
    train = manifest["split"] == "train"
    held = manifest["split"].isin(HELD_OUT)
    nonempty = texts != ""
    out = pd.concat([_excluded_rows(manifest, train & nonempty & texts.isin(held_prompts), "text_held_out", texts),
                     _excluded_rows(manifest, held & nonempty & ~texts.isin(held_prompts), "text_in_train", texts)])
    return out.sort_index(), held_prompts


def empty_excluded() -> pd.DataFrame:
    """The split report of a run that excludes nothing: no rows, the right columns."""
    return pd.DataFrame({c: pd.Series(dtype="string") for c in EXCLUDED_COLUMNS})


def check_held_out(before: pd.DataFrame, after: pd.DataFrame, excluded: pd.DataFrame) -> None:
    """Raise ValueError when excluding ``excluded`` emptied train, dev or test, or left a group that had test
    utterances with none (fusion tunes on dev and reports on test; the probe needs both classes in test)."""
    remedy = ("use a corpus whose dev/test prompts (and pictures) are held out of the train speakers' prompts, "
              "set split.disjoint_text: partition (everyone reads the same prompts: hold some out of train), "
              "or set split.disjoint_text: false (and split.disjoint_picture: false)")

    def why(part: pd.DataFrame) -> str:
        counts = part["reason"].value_counts()
        return ", ".join(f"{int(counts[r])} {r}" for r in REASONS if r in counts)

    for name in ("train", *HELD_OUT):
        had, has = before[before["split"] == name], after[after["split"] == name]
        if len(had) and not len(has):
            reasons = why(excluded[excluded["split"] == name])
            raise ValueError(f"split.disjoint_text leaves the {name} split empty: all {len(had)} {name} utterances "
                             f"share a normalised transcript or picture with train or a held-out prompt ({reasons}); "
                             f"{remedy}")
    if "group" in before:
        had = before[before["split"] == "test"]
        has = set(after.loc[after["split"] == "test", "group"].dropna())
        for group in sorted(set(had["group"].dropna()) - has):
            lost = excluded[(excluded["split"] == "test") & (excluded["group"] == group)]
            raise ValueError(f"split.disjoint_text leaves no test utterance of group '{group}': all "
                             f"{int((had['group'] == group).sum())} of them share a normalised transcript or picture "
                             f"with train ({why(lost)}); {remedy}")


def text_policy(cfg: dict) -> bool | str:
    """``split.disjoint_text`` as True, False or "partition"; anything else is an error."""
    policy = cfg.get("disjoint_text", False)
    if not (policy is True or policy is False or policy == "partition"):
        raise ValueError(f"split.disjoint_text must be true, false or partition, not {policy!r}")
    return policy


def make_splits(utts: pd.DataFrame, cfg: dict, norm: Callable[[str], str], seed: int
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, excluded): speaker-disjoint splits (:func:`assign_splits`), then the overlap policies
    ``cfg["disjoint_text"]`` (true | partition | false) and ``cfg["disjoint_picture"]`` move utterances out of
    the manifest into ``excluded``. With both off the manifest is :func:`assign_splits`' and ``excluded`` is
    empty."""
    policy, picture = text_policy(cfg), bool(cfg.get("disjoint_picture", False))
    if not policy and not picture:
        return assign_splits(utts, cfg, seed), empty_excluded()
    manifest = assign_splits(utts.reset_index(drop=True), cfg, seed)
    if policy == "partition":
        overlap, _ = prompt_partition_overlap(manifest, norm, cfg["dev_fraction"] + cfg["test_fraction"], seed)
        if picture:
            pics = train_overlap(manifest.drop(index=overlap.index), norm, text=False, picture=True)
            overlap = pd.concat([overlap, pics]).sort_index()
    else:
        overlap = train_overlap(manifest, norm, text=bool(policy), picture=picture)
    kept = manifest.drop(index=overlap.index)
    check_held_out(manifest, kept, overlap)
    return kept.reset_index(drop=True), overlap.reset_index(drop=True)


def exclusion_summary(manifest: pd.DataFrame, excluded: pd.DataFrame, norm: Callable[[str], str],
                      disjoint_text: bool | str, disjoint_picture: bool = False) -> dict:
    """split.json's exclusion keys: the policies, what was moved out per reason and split, and how many
    dev/test utterances of the manifest share a transcript (``*_n_text_in_train``) or, counted on its own
    whatever the policy, a picture (``*_n_image_in_train``) with train."""
    out: dict = {"disjoint_text": disjoint_text if disjoint_text == "partition" else bool(disjoint_text),
                 "disjoint_picture": bool(disjoint_picture), "n_excluded": int(len(excluded))}
    for reason in REASONS:
        out[f"n_excluded_{SHORT[reason]}"] = int((excluded["reason"] == reason).sum())
    for name in ("train", *HELD_OUT):
        part = excluded[excluded["split"] == name]
        out[f"{name}_n_excluded"] = int(len(part))
        for reason in REASONS:
            out[f"{name}_n_excluded_{SHORT[reason]}"] = int((part["reason"] == reason).sum())
    _, images, text_hit, image_hit = overlap_masks(manifest, norm)
    for name in HELD_OUT:
        part = manifest["split"] == name
        out[f"{name}_n_text_in_train"] = int((text_hit & part).sum())
        out[f"{name}_n_image_in_train"] = int((image_hit & part).sum())
        out[f"{name}_n_image_not_in_train"] = int((part & images.notna() & ~image_hit).sum())
    if disjoint_text == "partition":
        texts = _texts(manifest, norm)
        out["n_prompts_train"] = int(texts[(manifest["split"] == "train") & (texts != "")].nunique())
        out["n_prompts_held_out"] = int(texts[manifest["split"].isin(HELD_OUT) & (texts != "")].nunique())
    return out
