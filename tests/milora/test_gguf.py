"""GGUF paths: recognised by name, refused with a message that says what is wrong (the real file is loaded in
tests/real_model)."""

from __future__ import annotations

import importlib.util

import pytest

from milora import gguf
from milora.loading import load_model, load_processing_class


def test_gguf_paths_are_recognised_by_their_suffix(tmp_path):
    assert gguf.is_gguf_path("models/SmolLM2.Q4_1.gguf") and gguf.is_gguf_path(tmp_path / "X.GGUF")
    assert not gguf.is_gguf_path("models/llama") and not gguf.is_gguf_path("tiny:llama") and not gguf.is_gguf_path(None)


@pytest.mark.parametrize("loader", [load_model, load_processing_class])
def test_missing_or_foreign_files_are_refused_by_name(loader, tmp_path):
    with pytest.raises(gguf.GGUFError, match="GGUF file not found: .*absent.gguf"):
        loader(str(tmp_path / "absent.gguf"))
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(gguf.GGUFError, match="is not a file"):
        loader(str(tmp_path / "folder.gguf"))
    (tmp_path / "truncated.gguf").write_bytes(b"<html>")
    with pytest.raises(gguf.GGUFError, match="is not a GGUF file"):
        loader(str(tmp_path / "truncated.gguf"))


def test_the_gguf_package_is_asked_for_by_name(monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(16))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(gguf.GGUFError, match="pip install gguf"):
        load_model(str(tmp_path / "model.gguf"))


def test_conversion_cli_reports_a_bad_file_on_one_line(tmp_path, capsys):
    assert gguf.main([str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"milora.gguf: error: GGUF file not found: {tmp_path / 'absent.gguf'}"
    assert not (tmp_path / "out").exists()
