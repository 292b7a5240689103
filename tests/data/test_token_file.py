import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("ids,dtype", [([1.9, 2.7], "float64"), (np.array([1.0, 2.0], dtype=np.float32), "float32"),
                                       (torch.tensor([1.5]), "float32"), ([True, False], "bool")])
def test_ids_must_be_integers(tmp_path, ids, dtype):
    """Float ids were cast to int64, [1.9, 2.7] written as [1, 2]."""
    with pytest.raises(ValueError, match=rf"`ids` must be integer token ids .*, got {dtype} ids \(the first is"):
        write_token_file(tmp_path / "x.bin", ids, 10)
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("ids", [[3, 4], np.array([3, 4], dtype=np.uint16), np.array([3, 4], dtype=np.uint64),
                                 torch.tensor([3, 4]), torch.tensor([3, 4], dtype=torch.int32)])
def test_integer_ids_of_any_kind(tmp_path, ids):
    write_token_file(tmp_path / "x.bin", ids, 10)
    assert read_token_file(tmp_path / "x.bin", 10).tolist() == [3, 4]


def test_ids_are_reported_with_their_true_value(tmp_path):
    """A uint64 id past 2**63 was reported as a negative number after the cast to int64."""
    with pytest.raises(ValueError, match=r"token ids range from 9223372036854775813 to 9223372036854775813, outside"):
        write_token_file(tmp_path / "x.bin", np.array([2**63 + 5], dtype=np.uint64), 2**31)
    with pytest.raises(ValueError, match=r"token ids range from -1 to 18446744073709551616, outside the vocabulary"):
        write_token_file(tmp_path / "x.bin", [-1, 2**64], 10)


@pytest.mark.parametrize("vocab_size", [0, -1, 2**32, True, 10.0])
def test_vocab_size_must_fit_the_header(tmp_path, vocab_size):
    """2**32 raised a bare struct.error from packing the header; 0 and -1 a confusing range error."""
    with pytest.raises(ValueError, match=rf"`vocab_size` must be an integer in \[1, 4294967295\] .*, got {vocab_size}"):
        write_token_file(tmp_path / "x.bin", [0], vocab_size)
    write_token_file(tmp_path / "x.bin", [0, 7], 2**32 - 1)
    assert read_token_file(tmp_path / "x.bin", 2**32 - 1).tolist() == [0, 7]
