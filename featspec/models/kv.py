"""KV cache surgery on a transformers DynamicCache: keep exactly the tokens a sequence committed.

Done on each layer's key/value tensors directly because `Cache.crop` changed meaning across
transformers releases (a length in 4.x, a count to remove in 5.x).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache | None) -> dict:
    """The cache as the keyword this transformers release reads: `cache` from 5.25 on (`past_key_values`
    is deprecated there and removed in 5.40), `past_key_values` before. Passing the new name to an older
    release would vanish into **kwargs and silently run without a cache, so the signature decides."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def select_cache(cache: DynamicCache, positions: torch.Tensor) -> None:
    """Keep the given positions (sorted, 1-D index tensor) of every layer, in that order."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(-2, positions)
            layer.values = layer.values.index_select(-2, positions)
