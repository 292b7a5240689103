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


def test_continuation_pairs():
    pairs = Seq2SeqPairs.continuations(torch.arange(25), 4, 3, ByteTokenizer())
    assert len(pairs) == 3 and pairs[1] == ([7, 8, 9, 10], [11, 12, 13])
