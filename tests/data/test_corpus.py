import pytest

from lmrt.data import default_corpus, read_text


def test_default_corpus_is_the_pydoc_topics():
    text = default_corpus()
    assert 400_000 < len(text.encode("utf-8")) < 600_000
    assert "The \"import\" statement" in text and text == default_corpus()


def test_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("first ü", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert read_text(tmp_path / "b.txt") == "second"
    assert read_text(tmp_path) == "second\n\nfirst ü"  # sorted paths: b.txt before sub/a.md; the .png is skipped


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        read_text(tmp_path / "folder")
