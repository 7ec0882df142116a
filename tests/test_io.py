"""Atomic writes under faults: a full disk, a permission error or a crash mid-write leaves nothing at the
final path (or the previous complete file), and no temporary litter."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmasr import io as mio

DF = pd.DataFrame({"utt_id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def partial_then(err: int):
    """A writer that puts some bytes at its path, then fails as the OS would."""
    def write(_table_or_text, where=None, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(err, os.strerror(err), str(where))
    return write


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_parquet_disk_full_mid_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pq, "write_table", partial_then(errno.ENOSPC))
    with pytest.raises(OSError) as err:
        mio.write_parquet(tmp_path / "out.parquet", DF)
    assert err.value.errno == errno.ENOSPC
    assert listing(tmp_path) == []  # neither the final file nor the temporary


def test_failed_rewrite_keeps_the_previous_complete_file(tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    mio.write_parquet(out, DF)
    before = out.read_bytes()
    monkeypatch.setattr(pq, "write_table", partial_then(errno.ENOSPC))
    with pytest.raises(OSError):
        mio.write_parquet(out, DF.iloc[:1])
    assert out.read_bytes() == before
    assert listing(tmp_path) == ["out.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(out), DF)


def _temporaries_on_dev_full(monkeypatch):
    """Make every temporary file a link to /dev/full: the real writers then meet a real ENOSPC."""
    real = mio.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(os.devnull, os.O_RDONLY), name

    monkeypatch.setattr(mio.tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
@pytest.mark.parametrize("writer", ["parquet", "json", "text"])
def test_real_enospc_from_the_real_writers(tmp_path, monkeypatch, writer):
    _temporaries_on_dev_full(monkeypatch)
    out = tmp_path / f"out.{writer}"
    with pytest.raises(OSError) as err:
        if writer == "parquet":
            mio.write_parquet(out, DF)
        elif writer == "json":
            mio.write_json(out, {"n": list(range(5000))})
        else:
            with mio.atomic_path(out) as tmp:
                DF.to_csv(tmp, index=False)
    assert "No space left on device" in str(err.value) or getattr(err.value, "errno", None) == errno.ENOSPC
    assert listing(tmp_path) == []


def test_permission_error_on_rename_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(mio.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        mio.write_json(tmp_path / "m.json", {"a": 1})
    assert listing(tmp_path) == []


def test_permission_error_opening_the_temporary_leaves_nothing(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(PermissionError):
        mio.write_json(tmp_path / "m.json", {"a": 1})
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_gives_eacces_and_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            mio.write_parquet(folder / "out.parquet", DF)
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_unserialisable_metrics_write_nothing(tmp_path):
    with pytest.raises(ValueError):
        mio.write_json(tmp_path / "m.json", {"wer": float("nan")})
    assert listing(tmp_path) == []


def test_atomic_dir_failure_mid_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "audio"
    with mio.atomic_dir(final) as d:
        (d / "old.wav").write_bytes(b"old")
    with pytest.raises(OSError):
        with mio.atomic_dir(final) as d:
            (d / "new1.wav").write_bytes(b"new")
            disk_full()
    assert listing(final) == ["old.wav"] and (final / "old.wav").read_bytes() == b"old"
    assert listing(tmp_path) == ["audio"]
    with pytest.raises(OSError):
        with mio.atomic_dir(tmp_path / "fresh") as d:
            (d / "x").write_bytes(b"x")
            disk_full()
    assert listing(tmp_path) == ["audio"]


def test_atomic_dir_failed_swap_restores_the_old_folder(tmp_path, monkeypatch):
    final = tmp_path / "images"
    with mio.atomic_dir(final) as d:
        (d / "a.png").write_bytes(b"a")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst) == final and Path(src).name.endswith(".tmp"):
            raise OSError(errno.EIO, "injected")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        with mio.atomic_dir(final) as d:
            (d / "b.png").write_bytes(b"b")
    assert listing(final) == ["a.png"]
    assert listing(tmp_path) == ["images"]
    assert len(calls) == 3  # old aside, new in (fails), old back


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    final = tmp_path / "out"
    with mio.atomic_dir(final) as d:
        (d / "a").write_text("1")
    with mio.atomic_dir(final) as d:
        (d / "b").write_text("2")
    assert listing(final) == ["b"] and listing(tmp_path) == ["out"]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    stale = [tmp_path / ".out.parquet.ab12_xyz.parquet.tmp", tmp_path / ".shards.k3j9x0qq.tmp",
             tmp_path / ".shards.k3j9x0qq.old"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    stale[2].mkdir()
    unrelated = [tmp_path / ".other.parquet.ab12_xyz.parquet.tmp", tmp_path / ".out.parquet.notmine.tmp",
                 tmp_path / "notes.tmp"]
    for p in unrelated:
        p.write_bytes(b"keep")
    mio.write_parquet(tmp_path / "out.parquet", DF)
    with mio.atomic_dir(tmp_path / "shards") as d:
        (d / "0.parquet").write_bytes(b"x")
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"keep" for p in unrelated)


def test_outputs_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    mio.write_json(tmp_path / "m.json", {"a": 1})
    with mio.atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("x")
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


def test_many_writes_into_one_folder_list_it_once(tmp_path, monkeypatch):
    (tmp_path / ".u3.wav.abcdefgh.tmp.wav").write_bytes(b"stale")
    calls = []
    real = mio.os.scandir
    monkeypatch.setattr(mio.os, "scandir", lambda p: calls.append(p) or real(p))
    for i in range(50):
        with mio.atomic_path(tmp_path / f"u{i}.wav", suffix=".tmp.wav") as tmp:
            tmp.write_bytes(b"x")
    assert len(calls) == 1  # not once per file: O(n log n) for a folder of n outputs
    assert len(listing(tmp_path)) == 50 and not (tmp_path / ".u3.wav.abcdefgh.tmp.wav").exists()
