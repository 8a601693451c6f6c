import os

import pytest

from tasks.atomic import atomic_dir, atomic_file, is_complete, recover


def test_atomic_file_crash_keeps_previous(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("good")
    with pytest.raises(RuntimeError), atomic_file(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "good"
    assert os.listdir(tmp_path) == ["out.json"]  # no temp left behind


def test_atomic_dir_crash_keeps_previous_complete(tmp_path):
    d = tmp_path / "part"
    with atomic_dir(d) as tmp:
        (tmp / "a.bin").write_bytes(b"v1")
    assert is_complete(d)
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "a.bin").write_bytes(b"v2-partial")
        raise RuntimeError("crash mid-write")
    assert (d / "a.bin").read_bytes() == b"v1" and is_complete(d)
    assert sorted(os.listdir(tmp_path)) == ["part"]


def test_interrupted_swap_is_recovered(tmp_path):
    d = tmp_path / "part"
    with atomic_dir(d) as tmp:
        (tmp / "a.bin").write_bytes(b"v1")
    os.replace(d, tmp_path / ".part.old")  # crash between the two renames of a swap
    recover(d)
    assert (d / "a.bin").read_bytes() == b"v1" and is_complete(d)
