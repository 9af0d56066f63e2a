from pathlib import Path

import pytest

from fedpeft.atomic import atomic_dir, atomic_write_json, manifest_problem, write_manifest


def test_atomic_dir_replaces_whole_folder_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup folders left


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "good.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (dest / "good.txt").read_text() == "good"
    assert not (dest / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError), atomic_dir(f):
        pass
    assert f.read_text() == "x"


def test_atomic_write_json(tmp_path: Path) -> None:
    p = tmp_path / "a" / "m.json"
    atomic_write_json(p, {"b": 1})
    assert p.read_text() == '{\n  "b": 1\n}\n'


def test_manifest_names_the_file_that_changed(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "b.json").write_text("{}")
    assert manifest_problem(tmp_path) == "no manifest.json"
    write_manifest(tmp_path)
    assert manifest_problem(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"\x00" * 50 + b"\x01" + b"\x00" * 49)
    assert manifest_problem(tmp_path) == "a.bin does not match its sha256"
    (tmp_path / "a.bin").unlink()
    assert manifest_problem(tmp_path) == "a.bin is missing"
    (tmp_path / "manifest.json").write_text("[")
    assert manifest_problem(tmp_path) == "manifest.json is unreadable"
