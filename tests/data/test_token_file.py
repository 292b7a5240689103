import numpy as np
import pytest

from lmrt.data import read_token_file, write_token_file


@pytest.mark.parametrize("vocab_size,dtype", [(259, np.uint16), (65536, np.uint16), (100_000, np.uint32)])
def test_round_trip_through_a_memory_map(tmp_path, vocab_size, dtype):
    ids = np.random.default_rng(0).integers(0, vocab_size, 1000)
    write_token_file(tmp_path / "corpus.bin", ids, vocab_size)
    tokens = read_token_file(tmp_path / "corpus.bin", vocab_size)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype and not tokens.flags.writeable
    assert np.array_equal(tokens, ids)
    assert not (tmp_path / "corpus.bin.tmp").exists()


def test_ids_the_tokenizer_cannot_cover(tmp_path):
    with pytest.raises(ValueError, match=r"token ids range from 0 to 300, outside the vocabulary \[0, 259\)"):
        write_token_file(tmp_path / "x.bin", [0, 300], 259)
    write_token_file(tmp_path / "big.bin", [0, 300], 1000)
    with pytest.raises(ValueError, match="was written for a vocabulary of 1000 ids; the tokenizer has 259"):
        read_token_file(tmp_path / "big.bin", 259)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_token_file(tmp_path / "missing.bin")
    (tmp_path / "text.bin").write_bytes(b"hello world, not tokens")
    with pytest.raises(ValueError, match="is not an lmrt token file"):
        read_token_file(tmp_path / "text.bin")
    write_token_file(tmp_path / "cut.bin", [1, 2, 3], 259)
    with open(tmp_path / "cut.bin", "ab") as file:
        file.write(b"\x01")  # half a token
    with pytest.raises(ValueError, match="is corrupt"):
        read_token_file(tmp_path / "cut.bin")
    write_token_file(tmp_path / "empty.bin", [], 259)
    with pytest.raises(ValueError, match="holds no tokens"):
        read_token_file(tmp_path / "empty.bin")
