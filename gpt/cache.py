"""The key/value cache of generation: every layer's keys and values of the tokens seen so far, so that each new
token costs one token's forward instead of the whole context's.

A `KVCache` holds, per layer, keys and values of shape (batch, n_head, block_size, head_size), allocated at the
first token stored (in that token's dtype, so autocast applies) and filled left to right; every sequence of the
batch has the same `length`. The model's attention modules see one layer at a time through a `LayerCache`:
`store(k, v)` writes the new tokens at [length, length + T) and returns the keys and values of all tokens so far,
and `length` is where the new tokens sit (what the causal mask is aligned to). The fused attention module reads
the same protocol (kernels/modules.py), and on the Triton backend hands the layer's whole cache to
`kernels.decode_attention`, which appends in place itself.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One layer's (or, through `head`, one head's) keys and values, and the number of tokens already cached."""

    owner: "KVCache"
    layer: int
    length: int
    head_index: Optional[int] = None  # None: the whole layer, (B, H, block_size, D); else one head, (B, block_size, D)

    @property
    def keys(self) -> Optional[Tensor]:
        return self._select(self.owner.keys, self.layer)

    @property
    def values(self) -> Optional[Tensor]:
        return self._select(self.owner.values, self.layer)

    def _select(self, tensors, layer):
        if layer >= len(tensors) or tensors[layer] is None:
            return None
        return tensors[layer] if self.head_index is None else tensors[layer][:, self.head_index]

    def store(self, k: Tensor, v: Tensor):
        """Write the new tokens' keys and values ((B, H, T, D), or one head's (B, T, D)) after the cached ones;
        return the keys and values of every token so far."""
        self.owner.allocate(self.layer, k)
        keys, values = self.keys, self.values
        end = self.length + k.shape[-2]
        keys[..., self.length:end, :] = k
        values[..., self.length:end, :] = v
        return keys[..., :end, :], values[..., :end, :]

    def head(self, h: int) -> "LayerCache":
        """Head h's part of the layer's cache, for modules that compute one head at a time."""
        return LayerCache(self.owner, self.layer, self.length, h)


@dataclass
class KVCache:
    """Every layer's keys and values for a batch of sequences that grow together, up to block_size tokens."""

    n_layer: int
    n_head: int
    block_size: int
    head_size: int
    length: int = 0
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @classmethod
    def for_model(cls, config) -> "KVCache":
        return cls(config.n_layer, config.n_head, config.block_size, config.head_size)

    def allocate(self, layer: int, like: Tensor):
        """Allocate the layer's (B, H, block_size, D) keys and values on first use, in `like`'s dtype and device
        (`like`: the first keys stored, (B, H, T, D) or one head's (B, T, D))."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is None:
            shape = (like.shape[0], self.n_head, self.block_size, self.head_size)
            self.keys[layer] = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.empty_like(self.keys[layer])

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i, self.length)

    def reset(self):
        """Forget every token (the storage is kept)."""
        self.length = 0
