import json

import pytest

from lmrt.data import BPETokenizer, ByteTokenizer, default_corpus, load_tokenizer

TEXTS = ["", "hello, world", "ünïcödé 日本語 ✓ \x00\n\t", "def f(x):\n    return x ** 2\n",
         "x = <eos> y <pad><bos>"]  # special tokens' names written in a text are text


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    return BPETokenizer.train([default_corpus()[:100_000]], vocab_size=512)


def test_bytes_round_trip():
    tokenizer = ByteTokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (259, 256, 257, 258)
    assert tokenizer.decode([104, 105, tokenizer.eos_id, tokenizer.pad_id]) == "hi"  # special tokens print nothing


def test_bpe_round_trip_and_compression(bpe):
    assert bpe.vocab_size == 512
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (509, 510, 511)
    for text in TEXTS:
        assert bpe.decode(bpe.encode(text)) == text  # byte-level: every text is covered, even unseen characters
        assert not {bpe.pad_id, bpe.bos_id, bpe.eos_id} & set(bpe.encode(text))
    sample = default_corpus()[200_000:210_000]
    assert len(bpe.encode(sample)) < 0.6 * len(sample.encode("utf-8"))  # merges learned from the same kind of text


@pytest.mark.parametrize("make", [ByteTokenizer, "bpe"])
def test_saved_tokenizer_decodes_the_same(make, bpe, tmp_path):
    tokenizer = bpe if make == "bpe" else make()
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
    text = default_corpus()[5000:6000] + TEXTS[-1]
    assert loaded.encode(text) == tokenizer.encode(text)


def test_ids_outside_the_vocabulary(bpe):
    with pytest.raises(ValueError, match=r"ByteTokenizer.decode: token id 259 is outside the vocabulary \[0, 259\)"):
        ByteTokenizer().decode([1, 259])
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary \[0, 512\)"):
        bpe.decode([-1])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizer saved by lmrt"):
        load_tokenizer(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match="other.json: not a tokenizer saved by lmrt: unknown tokenizer kind"):
        load_tokenizer(tmp_path / "other.json")


@pytest.mark.parametrize("data", [{"kind": "bpe"}, {"kind": "bpe", "tokenizer": {}}],
                         ids=["no tokenizer entry", "empty tokenizer entry"])
def test_corrupt_bpe_tokenizer_files(data, tmp_path):
    """They raised a KeyError and the tokenizers library's bare Exception, which the CLI shows as tracebacks."""
    pytest.importorskip("tokenizers")
    (tmp_path / "corrupt.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupt.json: not a tokenizer saved by lmrt: its 'tokenizer' entry must "
                                         "be a tokenizer of the `tokenizers` library"):
        load_tokenizer(tmp_path / "corrupt.json")


def test_bpe_vocabulary_too_small():
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="`vocab_size` must be at least 259"):
        BPETokenizer.train(["abc"], vocab_size=100)
