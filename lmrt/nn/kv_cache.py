"""Key/value caches for incremental decoding: each new token then costs one query row, not a pass over the prefix.

A `LayerKVCache` holds one attention layer's keys and values, (batch, kv_heads, capacity, head_dim) buffers
allocated on first use in the keys' dtype and device (later keys must match them). `append` writes the new tokens'
keys and values after the cached ones and returns views of everything cached so far: views into the buffers, which
the attention op reads in place (it takes any strides), so no step copies the prefix. `reorder` follows beam
search's choice of beams.
The cache is for inference: a call with gradients may fill it, but appending then would overwrite in place what that
call saved for its backward, so it is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    """One attention layer's cached keys and values, for at most `capacity` positions."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"lmrt.nn.LayerKVCache: `capacity` must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Cache the keys and values of new tokens, (batch, kv_heads, new, dim) each; return all cached ones."""
        new = keys.shape[-2]
        if self.length + new > self.capacity:
            raise ValueError(f"lmrt.nn.LayerKVCache: {self.length} cached + {new} new positions exceed the "
                             f"capacity of {self.capacity}")
        if self._keys is None:
            batch, heads, _, dim = keys.shape
            self._keys = keys.new_empty(batch, heads, self.capacity, dim)
            self._values = values.new_empty(batch, heads, self.capacity, values.shape[-1])
        elif keys.shape[:2] != self._keys.shape[:2]:
            raise ValueError(f"lmrt.nn.LayerKVCache: new keys of shape {list(keys.shape)} do not match the cached "
                             f"(batch, heads) {list(self._keys.shape[:2])}")
        elif (keys.dtype, keys.device, values.dtype, values.device) != (self._keys.dtype, self._keys.device,
                                                                          self._values.dtype, self._values.device):
            raise ValueError(f"lmrt.nn.LayerKVCache: new keys and values ({keys.dtype} on {keys.device}, "
                             f"{values.dtype} on {values.device}) must match the cached ones ({self._keys.dtype} on "
                             f"{self._keys.device}, {self._values.dtype} on {self._values.device}); start a new "
                             f"cache to decode in another dtype or on another device")
        elif torch.is_grad_enabled() and (self._keys.requires_grad or self._values.requires_grad):
            raise RuntimeError("lmrt.nn.LayerKVCache: the cached keys and values are part of an autograd graph, "
                               "whose backward appending would break (it writes into them in place); decode under "
                               "torch.no_grad(), as lmrt.generation does")
        self._keys[:, :, self.length: self.length + new] = keys
        self._values[:, :, self.length: self.length + new] = values
        self.length += new
        return self.cached()

    def cached(self) -> tuple[Tensor, Tensor]:
        """Views of the cached keys and values, (batch, kv_heads, length, dim)."""
        if self._keys is None:
            raise ValueError("lmrt.nn.LayerKVCache: nothing is cached yet")
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def reorder(self, batch_indices: Tensor) -> None:
        """Keep batch rows `batch_indices` (beam search's surviving beams), in that order."""
        if self._keys is not None:
            self._keys = self._keys.index_select(0, batch_indices)
            self._values = self._values.index_select(0, batch_indices)


class KVCache:
    """The caches of a stack of `num_layers` attention layers, all of `capacity` positions."""

    def __init__(self, num_layers: int, capacity: int):
        self.layers = [LayerKVCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """How many positions are cached (the position of the next token)."""
        return self.layers[0].length if self.layers else 0

    def reorder(self, batch_indices: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(batch_indices)

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

