"""A small TalkBank-style CHAT corpus written on the fly: eSpeak NG speech, one long recording (> 30 s) per
speaker, two described pictures shared by every speaker plus a task without a picture, and the CHAT markup
the ingest must resolve. ``write_chat_corpus`` returns what it wrote, so tests check the ingest against it.

Layout under ``root``: ``cha/<spk>.cha``, ``media/<spk>.wav``, ``pictures/<task>.png``, ``task_pictures.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

TASKS = ("Broken Window", "Cat Rescue", "Cinderella")  # Cinderella has no picture row: ASR-only
PICTURED = {"Broken Window": "pictures/broken_window.png", "Cat Rescue": "pictures/cat_rescue.png",
            "Refused Umbrella": "pictures/refused_umbrella.png"}  # Refused Umbrella: used by no transcript
SILENCE_S = 0.8
MIN_RECORDING_S = 31.0

NOUNS = ("ball", "window", "ladder", "tree", "dog", "fireman", "boy", "mother", "bird", "shoe", "glass", "girl")
VERBS = ("kicked", "broke", "climbed", "found", "saw", "carried", "dropped", "watched")


@dataclass
class Utt:
    """One main-tier line: the CHAT words, what eSpeak says, the expected references, or the expected reject."""
    code: str
    chat: str
    spoken: str | None
    target: str | None = None
    audible: str | None = None
    reject: str | None = None
    bullet: bool = True
    start_ms: int | None = None
    end_ms: int | None = None
    task: str = ""


@dataclass
class Speaker:
    name: str
    group: str  # @ID group field
    voice: str
    utts: list[Utt] = field(default_factory=list)
    duration_s: float = 0.0


def speaker_lines(i: int) -> dict[str, list[Utt]]:
    """Per task, the lines of speaker ``i``: markup of every kind, words varied by speaker so transcripts differ."""
    n = lambda k: NOUNS[(i * 5 + k) % len(NOUNS)]  # noqa: E731  (5 and 12 coprime: 12 speakers differ)
    v = lambda k: VERBS[(i * 3 + k) % len(VERBS)]  # noqa: E731  (3 and 8 coprime)
    return {
        "Broken Window": [
            Utt("PAR", f"<the {n(0)}> [/] the {n(0)} {v(0)} the {n(1)} .", f"the {n(0)} the {n(0)} {v(0)} the {n(1)}",
                f"the {n(0)} {v(0)} the {n(1)}", f"the {n(0)} the {n(0)} {v(0)} the {n(1)}"),
            Utt("INV", "what happened next ?", "what happened next", reject="not_chosen"),
            Utt("PAR", f"the &-uh {n(2)} is broken (.) now .", f"the uh {n(2)} is broken now",
                f"the {n(2)} is broken now", f"the uh {n(2)} is broken now"),
            Utt("PAR", f"he &+th {v(1)} the {n(3)} &=laughs .", f"he th {v(1)} the {n(3)}",
                f"he {v(1)} the {n(3)}", f"he th {v(1)} the {n(3)}"),
            Utt("PAR", f"xxx the {n(4)} .", f"blah the {n(4)}", reject="unintelligible"),
        ],
        "Cat Rescue": [
            Utt("PAR", f"<the {n(5)}> [//] the {n(6)} is up a tree .", f"the {n(5)} the {n(6)} is up a tree",
                f"the {n(6)} is up a tree", f"the {n(5)} the {n(6)} is up a tree"),
            Utt("PAR", f"the man is windy [: angry] about the {n(7)} .", f"the man is windy about the {n(7)}",
                f"the man is angry about the {n(7)}", f"the man is windy about the {n(7)}"),
            Utt("PAR", f"the {n(8)} {v(2)} the ladder .", None, reject="missing_bullet", bullet=False),
            Utt("PAR", f"the {n(9)} {v(3)} a {n(10)} .", f"the {n(9)} {v(3)} a {n(10)}",
                f"the {n(9)} {v(3)} a {n(10)}", f"the {n(9)} {v(3)} a {n(10)}"),
        ],
        "Cinderella": [
            Utt("PAR", f"she lost her {n(11)} at the ball .", f"she lost her {n(11)} at the ball",
                f"she lost her {n(11)} at the ball", f"she lost her {n(11)} at the ball"),
            Utt("PAR", f"the prince {v(4)} the girl .", f"the prince {v(4)} the girl",
                f"the prince {v(4)} the girl", f"the prince {v(4)} the girl"),
            Utt("PAR", f"and then they got married .", None, reject="bullet_outside_media"),
        ],
    }


def chat_text(spk: Speaker, leading_gem: bool = True) -> str:
    """The .cha file of one speaker (an @G before the first utterance, as AphasiaBank files have)."""
    lines = ["@UTF8", "@Begin", "@Languages:\teng", "@Participants:\tPAR Participant, INV Investigator",
             f"@ID:\teng|synthetic|PAR|60;|male|{spk.group}||Participant|||",
             "@ID:\teng|synthetic|INV|||||Investigator|||", f"@Media:\t{spk.name}, audio"]
    task = None
    for u in spk.utts:
        if u.task != task:
            task = u.task
            lines.append(f"@G:\t{task}")
        bullet = f" \x15{u.start_ms}_{u.end_ms}\x15" if u.bullet else ""
        lines.append(f"*{u.code}:\t{u.chat}{bullet}")
    lines.append("@End")
    return "\n".join(lines) + "\n"


def write_chat_corpus(root: Path, n_speakers: int = 6, overlap_speaker: int = 0) -> dict:
    """Write the corpus; return {"root", "speakers": [Speaker], "task_pictures", "cha_dir", "media_dir"}.

    Half the speakers are in @ID group Aphasia (slower voices), half Control. Speaker ``overlap_speaker`` gets
    one extra line whose bullet overlaps its previous line (reject ``overlapping_bullet``).
    """
    from mmasr.demo.tts import ESPEAK_VOICES, espeak_synthesise

    cha_dir, media_dir, pic_dir = root / "cha", root / "media", root / "pictures"
    for d in (cha_dir, media_dir, pic_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for rel in PICTURED.values():
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / rel)
    (root / "task_pictures.csv").write_text("task,image_path\n" + "".join(f"{t},{p}\n" for t, p in PICTURED.items()))
    speakers = []
    for i in range(n_speakers):
        impaired = i % 2 == 0
        spk = Speaker(f"s{i:02d}", "Aphasia" if impaired else "Control", ESPEAK_VOICES[i % len(ESPEAK_VOICES)])
        chunks, pos, sr = [], 0, None
        for task, utts in speaker_lines(i).items():
            for u in utts:
                u.task = task
                spk.utts.append(u)
                if u.spoken is None:
                    continue
                audio, sr = espeak_synthesise(u.spoken, spk.voice if u.code == "PAR" else "en-us+m3",
                                              rate_wpm=120 if impaired and u.code == "PAR" else 165)
                gap = np.zeros(int(SILENCE_S * sr), dtype=np.float32)
                chunks += [gap, audio]
                pos += len(gap)
                u.start_ms, u.end_ms = round(pos / sr * 1000), round((pos + len(audio)) / sr * 1000)
                pos += len(audio)
        if i == overlap_speaker:
            prev = next(u for u in reversed(spk.utts) if u.code == "PAR" and u.start_ms is not None and not u.reject)
            extra = Utt("PAR", "the end .", None, reject="overlapping_bullet", task=prev.task,
                        start_ms=prev.start_ms + 100, end_ms=prev.end_ms + 200)
            spk.utts.insert(spk.utts.index(prev) + 1, extra)
        total = np.concatenate(chunks + [np.zeros(int(SILENCE_S * sr), dtype=np.float32)])
        if len(total) < MIN_RECORDING_S * sr:
            total = np.concatenate([total, np.zeros(int(MIN_RECORDING_S * sr) - len(total), dtype=np.float32)])
        spk.duration_s = len(total) / sr
        for u in spk.utts:
            if u.reject == "bullet_outside_media":
                u.start_ms, u.end_ms = round(spk.duration_s * 1000) + 1000, round(spk.duration_s * 1000) + 3000
        sf.write(media_dir / f"{spk.name}.wav", 0.5 * total / np.max(np.abs(total)), sr, subtype="PCM_16")
        (cha_dir / f"{spk.name}.cha").write_text(chat_text(spk), encoding="utf-8")
        speakers.append(spk)
    return {"root": root, "speakers": speakers, "task_pictures": root / "task_pictures.csv", "cha_dir": cha_dir,
            "media_dir": media_dir}


def chat_data_cfg(corpus: dict, reference: str = "target") -> dict:
    """The params ``data`` section for the corpus."""
    return {"source": "chat", "chat_root": str(corpus["cha_dir"]), "chat_media_root": str(corpus["media_dir"]),
            "chat_participants": ["PAR"], "chat_group_field": "group",
            "chat_groups": {"Aphasia": "impaired", "Control": "control"}, "chat_reference": reference,
            "task_pictures": str(corpus["task_pictures"]), "root": str(corpus["root"]), "require_image": False}
