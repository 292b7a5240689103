"""Incremental decoding with lmrt.nn's KV caches: attention and Transformer layers run token by token or in chunks
with a LayerKVCache equal one full causal pass (rotary positions, grouped-query heads, key padding, cross-attention
memory projected once); the cache's capacity, reordering for beam search and errors.

Tolerance: float32 assert_close defaults; a cached step computes the same float32 products as the full pass, over
the same keys, in another tiling: a wrong position, mask or cached row is off by far more.
"""

import pytest
import torch

import lmrt
from lmrt.nn import KVCache, LayerKVCache
from tests.conftest import BACKENDS, DEVICE
from tests.nn.test_attention import perturb

BATCH, LENGTH, EMBED = 3, 8, 24
# Row 0 unpadded, row 1 left-padded (as batched prompts are), row 2 right-padded. A left-padded row's first
# queries see padding only and give zeros on both paths alike.
PADDING = torch.tensor([[False] * 8, [True] * 2 + [False] * 6, [False] * 5 + [True] * 3], device=DEVICE)


def incremental(step, chunks, x, *args, **kwargs):
    """step(x_chunk, *args, **kwargs, cache=...) over consecutive chunks of x (of the given lengths), with one
    LayerKVCache of exactly the total length; `key_padding_mask` is cut to the keys cached so far."""
    assert sum(chunks) == x.shape[1]
    cache = LayerKVCache(x.shape[1])
    mask = kwargs.pop("key_padding_mask", None)
    outputs, start = [], 0
    for size in chunks:
        end = start + size
        if mask is not None:
            kwargs["key_padding_mask"] = mask[:, :end]
        outputs.append(step(x[:, start:end], *args, **kwargs, cache=cache))
        start = end
    assert cache.length == x.shape[1]
    return torch.cat(outputs, dim=1)


CHUNKS = {"token-by-token": [1] * LENGTH, "3-1-4": [3, 1, 4], "1-7": [1, 7]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("heads,kv_heads,chunks", [(3, 3, "token-by-token"), (3, 3, "3-1-4"), (6, 2, "1-7")])
def test_attention_incremental_matches_full(heads, kv_heads, chunks, padding, backend):
    rotary = lmrt.nn.RotaryEmbedding(EMBED // heads, max_length=LENGTH, device=DEVICE)
    module = perturb(lmrt.nn.MultiheadAttention(EMBED, heads, kv_heads, rotary=rotary, device=DEVICE))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    mask = PADDING if padding else None
    with lmrt.backend(backend), torch.no_grad():
        full = module(x, is_causal=True, key_padding_mask=mask)
        steps = incremental(module, CHUNKS[chunks], x, is_causal=True, key_padding_mask=mask)
    torch.testing.assert_close(steps, full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_incremental_matches_full(norm_first, backend):
    rotary = lmrt.nn.RotaryEmbedding(8, max_length=LENGTH, device=DEVICE)
    layer = perturb(lmrt.nn.TransformerEncoderLayer(EMBED, 3, 40, norm_first=norm_first, rotary=rotary,
                                                    device=DEVICE))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    with lmrt.backend(backend), torch.no_grad():
        full = layer(x, key_padding_mask=PADDING, is_causal=True)
        steps = incremental(layer, [3, 1, 4], x, key_padding_mask=PADDING, is_causal=True)
    torch.testing.assert_close(steps, full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_layer_incremental_matches_full(backend):
    layer = perturb(lmrt.nn.TransformerDecoderLayer(EMBED, 3, 40, memory_dim=20, device=DEVICE))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    memory = torch.randn(BATCH, 5, 20, device=DEVICE)
    memory_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4], device=DEVICE)
    cache, cross_cache = LayerKVCache(LENGTH), LayerKVCache(5)
    with lmrt.backend(backend), torch.no_grad():
        full = layer(x, memory, memory_key_padding_mask=memory_mask)
        # Memory is passed on the first step only: later steps read its projection from cross_cache.
        steps = [layer(x[:, i: i + 1], memory if i == 0 else None, memory_key_padding_mask=memory_mask,
                       cache=cache, cross_cache=cross_cache) for i in range(LENGTH)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == LENGTH and cross_cache.length == 5


def test_cross_attention_projects_memory_once():
    module = perturb(lmrt.nn.MultiheadAttention(EMBED, 3, cross_attention=True, kdim=20, device=DEVICE))
    projections = []
    module.kv_proj.register_forward_hook(lambda *args: projections.append(1))
    x = torch.randn(BATCH, 4, EMBED, device=DEVICE)
    memory = torch.randn(BATCH, 6, 20, device=DEVICE)
    mask = torch.tensor([[False] * 6, [False] * 2 + [True] * 4, [False] * 5 + [True]], device=DEVICE)
    with torch.no_grad():
        full = module(x, memory, key_padding_mask=mask)
        assert len(projections) == 1
        cache = LayerKVCache(6)
        first = module(x[:, :2], memory, key_padding_mask=mask, cache=cache)
        rest = module(x[:, 2:], None, key_padding_mask=mask, cache=cache)
    assert len(projections) == 2, "the cached call should project memory once, on its first step"
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full)
    assert cache.length == 6


def test_reorder_follows_beams():
    # Beam search keeps beams (2, 0, 0): the cache reordered after a prefix gives the outputs of the full pass on
    # the reordered prefix.
    rotary = lmrt.nn.RotaryEmbedding(8, max_length=LENGTH, device=DEVICE)
    module = perturb(lmrt.nn.MultiheadAttention(EMBED, 3, rotary=rotary, device=DEVICE))
    prefix = torch.randn(BATCH, 5, EMBED, device=DEVICE)
    new = torch.randn(BATCH, 3, EMBED, device=DEVICE)
    beams = torch.tensor([2, 0, 0], device=DEVICE)
    cache = LayerKVCache(LENGTH)
    with torch.no_grad():
        module(prefix, is_causal=True, cache=cache)
        cache.reorder(beams)
        steps = torch.cat([module(new[:, i: i + 1], is_causal=True, cache=cache) for i in range(3)], dim=1)
        full = module(torch.cat([prefix[beams], new], dim=1), is_causal=True)
    torch.testing.assert_close(steps, full[:, 5:])


def test_layer_cache_append_reorder_and_views():
    cache = LayerKVCache(6)
    keys, values = torch.randn(2, BATCH, 2, 5, 4, device=DEVICE)
    first_keys, _ = cache.append(keys[:, :, :3], values[:, :, :3])
    all_keys, all_values = cache.append(keys[:, :, 3:], values[:, :, 3:])
    assert cache.length == 5
    torch.testing.assert_close(all_keys, keys, rtol=0, atol=0)
    torch.testing.assert_close(all_values, values, rtol=0, atol=0)
    # The cached keys are views of one buffer: a step reads the prefix in place, it does not copy it.
    assert first_keys.data_ptr() == all_keys.data_ptr()
    rows = torch.tensor([1, 2, 1], device=DEVICE)
    cache.reorder(rows)
    reordered_keys, reordered_values = cache.cached()
    torch.testing.assert_close(reordered_keys, keys[rows], rtol=0, atol=0)
    torch.testing.assert_close(reordered_values, values[rows], rtol=0, atol=0)


def test_capacity_overflow():
    cache = LayerKVCache(5)
    keys = torch.randn(BATCH, 2, 3, 4, device=DEVICE)
    cache.append(keys, keys)
    with pytest.raises(ValueError, match="3 cached \\+ 3 new positions exceed the capacity of 5"):
        cache.append(keys, keys)
    assert cache.length == 3, "a refused append should leave the cache as it was"
    module = lmrt.nn.MultiheadAttention(EMBED, 3, device=DEVICE)
    cache = LayerKVCache(4)
    with torch.no_grad():
        module(torch.randn(BATCH, 3, EMBED, device=DEVICE), is_causal=True, cache=cache)
        with pytest.raises(ValueError, match="3 cached \\+ 2 new positions exceed the capacity of 4"):
            module(torch.randn(BATCH, 2, EMBED, device=DEVICE), is_causal=True, cache=cache)


def test_keys_of_another_dtype_are_refused():
    cache = LayerKVCache(5)
    keys = torch.randn(BATCH, 2, 1, 4, device=DEVICE)
    cache.append(keys.bfloat16(), keys.bfloat16())  # a first step under autocast, say
    with pytest.raises(ValueError, match="float32 on .*must match the cached ones \\(torch.bfloat16"):
        cache.append(keys, keys)  # was rounded to bfloat16 into the cache without a word
    assert cache.length == 1, "a refused append should leave the cache as it was"


def test_a_refused_key_padding_mask_leaves_the_cache_alone():
    """The mask is checked against the cached and new keys before the new ones are appended: a call refused for its
    mask used to cache its tokens all the same, shifting every later position."""
    module = lmrt.nn.MultiheadAttention(EMBED, 3, device=DEVICE)
    cache = LayerKVCache(8)
    x = torch.randn(BATCH, 5, EMBED, device=DEVICE)
    with torch.no_grad():
        module(x[:, :3], is_causal=True, cache=cache)
        with pytest.raises(ValueError, match=r"`key_padding_mask` must be a bool tensor of shape \(3, 5\), got "
                                             r"torch.bool of shape \[3, 3\]"):
            module(x[:, 3:], is_causal=True, cache=cache, key_padding_mask=torch.zeros(BATCH, 3, dtype=torch.bool))
        assert cache.length == 3
        steps = module(x[:, 3:], is_causal=True, cache=cache, key_padding_mask=torch.zeros(BATCH, 5, dtype=torch.bool))
        torch.testing.assert_close(steps, module(x, is_causal=True)[:, 3:])


def test_appending_to_a_cache_in_an_autograd_graph_is_refused():
    """A call with gradients may fill the cache (its backward works); the next append would overwrite what that call
    saved for backward, and the backward would fail with torch's in-place error."""
    module = lmrt.nn.MultiheadAttention(EMBED, 3, device=DEVICE)
    cache = LayerKVCache(8)
    x = torch.randn(BATCH, 5, EMBED, device=DEVICE)
    module(x[:, :3], is_causal=True, cache=cache).sum().backward()
    with pytest.raises(RuntimeError, match="LayerKVCache: the cached keys and values are part of an autograd graph"):
        module(x[:, 3:], is_causal=True, cache=cache)
    assert cache.length == 3


def test_positions_continue_after_cached_ones():
    # The rotary table has 6 positions: 4 cached tokens and 3 new ones need positions 4 to 6, one too many.
    rotary = lmrt.nn.RotaryEmbedding(8, max_length=6, device=DEVICE)
    module = lmrt.nn.MultiheadAttention(EMBED, 3, rotary=rotary, device=DEVICE)
    cache = LayerKVCache(10)
    module(torch.randn(BATCH, 4, EMBED, device=DEVICE), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match="positions 4 to 6 do not fit the table of max_length=6"):
        module(torch.randn(BATCH, 3, EMBED, device=DEVICE), is_causal=True, cache=cache)


def test_model_cache():
    cache = KVCache(num_layers=3, capacity=6)
    assert len(cache) == 3 and cache.length == 0
    assert len({id(cache[i]) for i in range(3)}) == 3, "each layer needs a cache of its own"
    keys = torch.randn(BATCH, 2, 4, 4, device=DEVICE)
    for i in range(3):
        cache[i].append(keys + i, keys - i)
    assert cache.length == 4
    rows = torch.tensor([2, 2, 0], device=DEVICE)
    cache.reorder(rows)
    for i in range(3):
        cached_keys, cached_values = cache[i].cached()
        torch.testing.assert_close(cached_keys, keys[rows] + i, rtol=0, atol=0)
        torch.testing.assert_close(cached_values, keys[rows] - i, rtol=0, atol=0)
    assert KVCache(num_layers=0, capacity=6).length == 0


class TestBadUse:
    def test_capacity_at_least_one(self):
        with pytest.raises(ValueError, match="`capacity` must be >= 1, got 0"):
            LayerKVCache(0)

    def test_nothing_cached(self):
        with pytest.raises(ValueError, match="nothing is cached yet"):
            LayerKVCache(4).cached()

    def test_batch_or_heads_mismatch(self):
        cache = LayerKVCache(8)
        cache.append(*torch.randn(2, BATCH, 2, 3, 4))
        with pytest.raises(ValueError, match=r"new keys of shape \[3, 1, 1, 4\] do not match the cached "
                                             r"\(batch, heads\) \[3, 2\]"):
            cache.append(*torch.randn(2, BATCH, 1, 1, 4))
