"""milora.io: directories appear whole or not at all."""

import pytest

from milora.io import atomic_directory, replace_directory


def test_replace_directory_replaces_an_existing_one_and_leaves_nothing_beside_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "new.txt").write_text("new")
    replace_directory(tmp_path / "staging", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_directory_into_a_new_place(tmp_path):
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "a").write_text("a")
    replace_directory(tmp_path / "staging", tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "a" and not (tmp_path / "staging").exists()


def test_atomic_directory_keeps_the_old_directory_when_writing_fails(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "first").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "second").write_text("2")
        raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
