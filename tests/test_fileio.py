"""fileio: atomic writes leave the old file or the new one, never a torn one; JSON-safe values; digests."""

import json
import math
import os
import stat

import pytest
import torch

from circuit_breakers.fileio import (
    atomic_dir,
    atomic_open,
    decode_utf8,
    digest,
    json_safe,
    replace_dir,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_json_and_jsonl_round_trip(tmp_path):
    doc = {"a": 1.5, "b": math.inf, "c": [float("nan"), 2], "t": torch.zeros(2, 3)}
    path = write_json_atomic(tmp_path / "sub" / "d.json", doc)
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [None, 2], "t": {"tensor_shape": [2, 3]}}
    rows = write_jsonl_atomic(tmp_path / "r.jsonl", [{"x": 1}, {"x": "é"}])
    assert [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()] == [{"x": 1}, {"x": "é"}]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as staging:
        (staging / "w").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as staging:
            (staging / "w").write_text("2")
            raise KeyboardInterrupt
    assert (final / "w").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    staging = tmp_path / "new"
    staging.mkdir()
    (staging / "w").write_text("3")
    replace_dir(staging, final)
    assert (final / "w").read_text() == "3" and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_safe_and_digest():
    assert json_safe({1: (1, -math.inf), "o": object}) == {"1": [1, None], "o": repr(object)}
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest("x")) == 16 and len(digest("x", length=8)) == 8


def test_written_files_and_folders_get_the_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as staging:
            (staging / "w").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_umask_permissions_opens_up_what_libraries_wrote_private(tmp_path):
    from safetensors.torch import save_file

    from circuit_breakers.fileio import umask_permissions

    old = os.umask(0o022)
    try:
        (tmp_path / "m" / "sub").mkdir(parents=True, mode=0o700)
        save_file({"a": torch.zeros(2)}, str(tmp_path / "m" / "sub" / "w.safetensors"))  # written 0600
        umask_permissions(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m" / "sub" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m" / "sub").stat().st_mode) == 0o755


def test_decode_utf8_names_the_line_of_the_first_bad_byte():
    assert decode_utf8("é\n".encode(), "f.txt") == "é\n"
    with pytest.raises(KeyError, match=r"f.txt:3: not UTF-8 text \(byte 0xff\)"):
        decode_utf8(b"a\nb\n\xff\n", "f.txt", KeyError)
    with pytest.raises(ValueError, match=r"d.jsonl:12: not UTF-8"):
        decode_utf8(b"\xfe", "d.jsonl", first_line=12)
