import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lmrt.data import ByteTokenizer, LanguageModelWindows, Seq2SeqPairs, read_token_file, split_tokens, write_token_file
from lmrt.models import IGNORE_INDEX


def test_split_is_deterministic_and_disjoint():
    tokens = torch.arange(1000)
    train, validation = split_tokens(tokens, 0.1)
    assert torch.equal(torch.cat([train, validation]), tokens) and len(validation) == 100
    with pytest.raises(ValueError, match=r"`validation_fraction` must be in \(0, 1\), got 1.5"):
        split_tokens(tokens, 1.5)


def test_windows_are_shifted_pairs_that_tile_the_stream(tmp_path):
    write_token_file(tmp_path / "c.bin", np.arange(103) % 259, 259)
    windows = LanguageModelWindows(read_token_file(tmp_path / "c.bin", 259), context_length=10)
    assert len(windows) == 10
    idx, targets = windows[3]
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.arange(30, 40)) and torch.equal(targets, idx + 1)
    offsets = set()
    for epoch in range(20):
        windows.set_epoch(epoch)
        offsets.add(windows.offset)
        last_idx, last_targets = windows[len(windows) - 1]  # the last window still fits with every offset
        assert len(last_targets) == 10 and last_targets[-1] <= 102
    assert len(offsets) > 1 and max(offsets) <= 2  # 103 tokens leave 2 spare for the offset
    windows.set_epoch(7)
    first = windows[0]
    windows.set_epoch(7)
    assert torch.equal(windows[0][0], first[0])  # an epoch is always the same windows


def test_windows_under_a_distributed_sampler():
    """Two ranks of a DistributedSampler split an epoch's windows between them, without overlap."""
    windows = LanguageModelWindows(torch.arange(401), context_length=10)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(windows, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for idx, _ in DataLoader(windows, batch_size=4, sampler=sampler):
            seen.extend(idx[:, 0].tolist())
    assert sorted(seen) == list(range(0, 400, 10))


def test_window_offsets_of_existing_runs_stay_the_same():
    """The offsets that seeds 0 (the default), 1337 (TrainConfig's) and -1 drew before seeds past ~1.8e13 were
    allowed: a run resumed from a checkpoint must see the same windows as the uninterrupted one."""
    drawn = {0: [44, 45, 48, 86, 30, 11], 1337: [82, 20, 26, 28, 36, 77], -1: [86, 30, 56, 9, 56, 2]}
    for seed, offsets in drawn.items():
        windows = LanguageModelWindows(torch.arange(1000), context_length=100, seed=seed)
        for epoch, offset in enumerate(offsets):
            windows.set_epoch(epoch)
            assert windows.offset == offset and windows[0][0][0] == offset, (seed, epoch)


@pytest.mark.parametrize("seed", [10**14, 2**63, 2**64 - 1, 2**64 + 1337, 2**70, -2**70])
def test_any_integer_seed(seed):
    """torch.manual_seed takes seeds up to 2**64; seed * 1_000_003 + epoch overflowed it from seed ~1.8e13 on."""
    windows = LanguageModelWindows(torch.arange(1000), context_length=100, seed=seed)
    offsets = []
    for epoch in range(3):
        windows.set_epoch(epoch)
        offsets.append(windows.offset)
    windows.set_epoch(0)
    assert windows.offset == offsets[0] and all(0 <= offset < 100 for offset in offsets)
    if seed == 2**64 + 1337:  # the combined seed is taken modulo 2**64, as manual_seed takes it
        assert offsets == [82, 20, 26]
    with pytest.raises(ValueError, match=r"`seed` must be an integer, got 1.5"):
        LanguageModelWindows(torch.arange(1000), context_length=100, seed=1.5)


def test_too_short_stream():
    with pytest.raises(ValueError, match="a window of context_length=10 needs at least 11"):
        LanguageModelWindows(torch.arange(10), 10)


def test_pairs_from_tsv_and_collate(tmp_path):
    (tmp_path / "pairs.tsv").write_text("ab\tXYZ\n\nhello\tworld\n", encoding="utf-8")
    tokenizer = ByteTokenizer()
    pairs = Seq2SeqPairs.from_tsv(tmp_path / "pairs.tsv", tokenizer, max_length=4)
    assert len(pairs) == 2 and pairs[1] == (list(b"hell"), list(b"wor"))  # the target keeps room for <eos>
    src, tgt, targets = pairs.collate([pairs[0], pairs[1]])
    pad, bos, eos = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    assert src.tolist() == [[97, 98, pad, pad], list(b"hell")]
    assert tgt.tolist() == [[bos, *b"XYZ"], [bos, *b"wor"]]
    assert targets.tolist() == [[*b"XYZ", eos], [*b"wor", eos]]
    short = pairs.collate([([1], [2]), ([3, 4], [5, 6, 7])])[2]
    assert short[0].tolist() == [2, eos, IGNORE_INDEX, IGNORE_INDEX]


def test_bad_pairs_file(tmp_path):
    (tmp_path / "pairs.tsv").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.tsv, line 1: expected `source<TAB>target`"):
        Seq2SeqPairs.from_tsv(tmp_path / "pairs.tsv", ByteTokenizer(), max_length=8)


def test_pairs_file_lines_end_at_newlines_only(tmp_path):
    """A field may hold a form feed, \\x1c-\\x1e, \\x85 or \\u2028: str.splitlines broke the line there and refused
    the pieces as lines without a tab. \\r\\n line ends still count as one."""
    text = "page one\x0cpage two\tSeite eins\x0cSeite zwei\r\n\nline\u2028sep\x1c\x85\tZeile\n\n"
    (tmp_path / "pairs.tsv").write_bytes(text.encode("utf-8"))
    tokenizer = ByteTokenizer()
    pairs = Seq2SeqPairs.from_tsv(tmp_path / "pairs.tsv", tokenizer, max_length=64)
    assert len(pairs) == 2
    assert pairs[0] == (tokenizer.encode("page one\x0cpage two"), tokenizer.encode("Seite eins\x0cSeite zwei"))
    assert pairs[1] == (tokenizer.encode("line\u2028sep\x1c\x85"), tokenizer.encode("Zeile"))
    (tmp_path / "bad.tsv").write_bytes(b"a\x0cb\tc\n\nno tab\x0chere\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 3: expected `source<TAB>target`, got 'no tab\\x0chere'"):
        Seq2SeqPairs.from_tsv(tmp_path / "bad.tsv", tokenizer, max_length=64)


@pytest.mark.parametrize("max_length", [0, -3, 2.0, True, None])
def test_pairs_file_max_length_must_be_positive(tmp_path, max_length):
    """max_length=0 cut the target to [:-1], keeping all but its last token, instead of to nothing."""
    (tmp_path / "pairs.tsv").write_text("abc\tdefg\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"`max_length` must be an integer >= 1 \(.*\), got {max_length}"):
        Seq2SeqPairs.from_tsv(tmp_path / "pairs.tsv", ByteTokenizer(), max_length=max_length)
    shortest = Seq2SeqPairs.from_tsv(tmp_path / "pairs.tsv", ByteTokenizer(), max_length=1)
    assert shortest.pairs == [([97], [])]  # the target's one token is its <eos>


def test_continuation_pairs():
    pairs = Seq2SeqPairs.continuations(torch.arange(25), 4, 3, ByteTokenizer())
    assert len(pairs) == 3 and pairs[1] == ([7, 8, 9, 10], [11, 12, 13])
