import os

import pandas as pd
import pytest

from mmasr.data.ingest import ingest_manifest, ingest_torgo, resolve_inside, slug, torgo_group, torgo_prompt_problem
from tests.conftest import tone, write_picture, write_wav


def _corpus(root):
    for name in ("a.wav", "b.wav", "sub/c.wav"):
        write_wav(root / name, tone())
    write_picture(root / "pics" / "bear.png")
    return root


def test_csv_manifest_resolves_paths_relative_to_the_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _corpus(tmp_path / "corpus")
    (root / "m.csv").write_text(
        "utt_id,audio_path,text,speaker,group,image_path,extra\n"
        "u1,a.wav,a red bear,S1,impaired,pics/bear.png,x\n"
        "u2,sub/c.wav,NA,S2,,,y\n")
    df, rejects = ingest_manifest(root / "m.csv")
    assert rejects.empty
    assert df["utt_id"].tolist() == ["u1", "u2"]
    assert df["audio_path"].tolist() == ["corpus/a.wav", "corpus/sub/c.wav"]  # relative to the working dir
    assert df.loc[0, "image_id"] == "pics_bear" and df.loc[0, "image_path"] == "corpus/pics/bear.png"
    assert pd.isna(df.loc[1, "image_id"])
    assert df["text"].tolist() == ["a red bear", "NA"]  # the word NA is a transcript, not a missing value
    assert df["group"].tolist() == ["impaired", "unknown"]
    assert (df["source"] == "manifest").all()


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "crlf"])
def test_tsv_parquet_and_crlf_manifests_read_the_same(tmp_path, fmt):
    root = _corpus(tmp_path)
    rows = pd.DataFrame({"audio_path": ["a.wav", "b.wav"], "text": ["one", "two"], "speaker": ["S1", "S2"]})
    if fmt == "tsv":
        path = root / "m.tsv"
        rows.to_csv(path, sep="\t", index=False)
    elif fmt == "parquet":
        path = root / "m.parquet"
        rows.to_parquet(path)
    else:
        path = root / "m.csv"
        path.write_bytes(b"\xef\xbb\xbfAudio_Path,Text,Speaker\r\na.wav,one,S1\r\nb.wav,two,S2\r\n")  # BOM, CRLF, case
    df, rejects = ingest_manifest(path)
    assert rejects.empty
    assert df["utt_id"].tolist() == ["a", "b"]  # derived from the audio file name
    assert df["text"].tolist() == ["one", "two"]


def test_missing_required_column_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("audio_path,text\na.wav,hi\n")
    with pytest.raises(ValueError, match=r"m\.csv: manifest is missing required column\(s\) 'speaker'"):
        ingest_manifest(tmp_path / "m.csv")


def test_unknown_format_and_bad_split_are_errors(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported manifest format"):
        ingest_manifest(tmp_path / "m.json")
    _corpus(tmp_path)
    (tmp_path / "m.csv").write_text("audio_path,text,speaker,split\na.wav,hi,S1,validation\n")
    with pytest.raises(ValueError, match="split 'validation' is not one of train, dev, test"):
        ingest_manifest(tmp_path / "m.csv")


def test_escaping_paths_duplicates_and_missing_speaker_become_rejects(tmp_path):
    root = _corpus(tmp_path / "corpus")
    outside = write_wav(tmp_path / "secret.wav", tone())
    os.symlink(outside, root / "link.wav")
    (root / "m.csv").write_text(
        "utt_id,audio_path,text,speaker,image_path\n"
        "u1,a.wav,one,S1,../secret.png\n"
        f"u2,{outside},two,S1,\n"            # absolute path outside the root
        "u3,../secret.wav,three,S1,\n"        # relative path escaping the root
        "u4,link.wav,four,S1,\n"              # symbolic link pointing outside
        "u1,b.wav,five,S1,\n"                 # duplicate id
        "u6,b.wav,six,,\n"                    # no speaker
        f"u7,{root / 'b.wav'},seven,S2,\n")   # absolute but inside: fine
    df, rejects = ingest_manifest(root / "m.csv")
    assert df["utt_id"].tolist() == ["u1", "u7"]
    assert pd.isna(df.loc[0, "image_path"])  # the escaping picture is dropped from the row...
    got = sorted(zip(rejects["id"], rejects["kind"], rejects["reason"]))
    assert got == sorted([  # ...and accounted for here
        ("u1", "image", "path_outside_root"), ("u2", "utterance", "path_outside_root"),
        ("u3", "utterance", "path_outside_root"), ("u4", "utterance", "path_outside_root"),
        ("u1", "utterance", "duplicate_id"), ("u6", "utterance", "missing_speaker")])
    assert rejects.loc[rejects["reason"] == "duplicate_id", "detail"].item().endswith("already used by m.csv row 2")


def test_explicit_root_allows_paths_beside_the_manifest_folder(tmp_path):
    write_wav(tmp_path / "audio" / "a.wav", tone())
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("audio_path,text,speaker\n../audio/a.wav,hi,S1\n")
    assert ingest_manifest(tmp_path / "lists" / "m.csv")[1]["reason"].tolist() == ["path_outside_root"]
    assert len(ingest_manifest(tmp_path / "lists" / "m.csv", root=tmp_path)[0]) == 1


def test_resolve_inside_and_slug(tmp_path):
    assert resolve_inside(tmp_path, tmp_path, "x/y.wav") == (tmp_path / "x/y.wav").resolve()
    assert resolve_inside(tmp_path / "x", tmp_path / "x", "../y.wav") is None
    assert slug("F01/Session 1:x") == "F01_Session_1_x"


def _torgo(root):
    """A TORGO-shaped tree: two speakers, sessions with and without the array microphone."""
    s1 = root / "F01" / "Session1"
    for n, text in [("0001", "bear"), ("0002", "[say Ah-P-Eee repeatedly]"), ("0003", "input/images/kitchen.jpg"),
                    ("0004", "the quick brown fox")]:
        write_wav(s1 / "wav_arrayMic" / f"{n}.wav", tone(0.5))
        write_wav(s1 / "wav_headMic" / f"{n}.wav", tone(0.5))
        (s1 / "prompts").mkdir(parents=True, exist_ok=True)
        (s1 / "prompts" / f"{n}.txt").write_text(text + "\n")
    write_wav(s1 / "wav_arrayMic" / "0005.wav", tone(0.5))  # no prompt file
    s2 = root / "MC02" / "Session2"  # head microphone only
    write_wav(s2 / "wav_headMic" / "0010.wav", tone(0.5))
    (s2 / "prompts").mkdir(parents=True)
    (s2 / "prompts" / "0010.txt").write_text("pear")
    s3 = root / "MC02" / "Session3"  # prompts but no audio at all
    (s3 / "prompts").mkdir(parents=True)
    (s3 / "prompts" / "0001.txt").write_text("goat")
    return root


def test_torgo_import_ids_groups_mic_fallback_and_skipped_prompts(tmp_path):
    df, rejects = ingest_torgo(_torgo(tmp_path / "TORGO"), mic="array")
    assert df["utt_id"].tolist() == ["F01_S1_array_0001", "F01_S1_array_0004", "MC02_S2_head_0010"]
    assert df["group"].tolist() == ["impaired", "impaired", "control"]
    assert df["text"].tolist() == ["bear", "the quick brown fox", "pear"]
    assert df["audio_path"].str.contains("wav_arrayMic").tolist() == [True, True, False]
    assert sorted(rejects["reason"]) == ["instruction_prompt", "missing_audio", "missing_transcript", "picture_prompt"]
    head, _ = ingest_torgo(tmp_path / "TORGO", mic="head")
    assert head["utt_id"].tolist()[:2] == ["F01_S1_head_0001", "F01_S1_head_0004"]


def test_torgo_helpers():
    assert [torgo_group(s) for s in ("F01", "M05", "FC01", "MC04", "X1")] == [
        "impaired", "impaired", "control", "control", "unknown"]
    assert torgo_prompt_problem("[relax your mouth]") == "instruction_prompt"
    assert torgo_prompt_problem("/tmp/input/images/pic.jpg") == "picture_prompt"
    assert torgo_prompt_problem("   ") == "empty_transcript"
    assert torgo_prompt_problem("bear") is None
