"""Speaker-disjoint train/dev/test splits.

Speakers, not utterances, are assigned to splits, so no voice is heard in training and test alike.
Precedence: a leave-one-speaker-out ``holdout_speaker``; else explicit speaker lists from params;
else splits given in the manifest; else a seeded split stratified by group, so each split holds
impaired and control speakers whenever the data has enough of each.
"""

from __future__ import annotations

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
    elif "split" in utts and utts["split"].notna().all() and len(utts):
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
