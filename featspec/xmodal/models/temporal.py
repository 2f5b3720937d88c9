"""Divided space-time attention for the mini target's video tower, as in Video-LLaVA's native tower.

Video-LLaVA encodes its 8 frames with LanguageBind's video encoder: a CLIP ViT whose every layer first
attends across the frames at each patch position (with a learned per-frame embedding), then within the
frame. transformers' port runs a plain CLIP tower per frame, so video tokens there know nothing about
other frames, and a language model must compare frames itself to tell a motion's direction, which the mini
target never learned (docs/crossmodal.md). `add_temporal_attention` gives the mini tower LanguageBind's
temporal step without copying CLIP: each `CLIPEncoderLayer` gets a `temporal` submodule applied by a
forward pre-hook, so the spatial weights keep their names and a tower trained without it loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class TemporalMixer(nn.Module):
    """Pre-norm attention over the frame axis at each token position; starts as the identity (zero output
    projection), so adding it to a trained tower changes nothing until it trains.

    The frame embedding goes into the attention's input, not into the residual stream as in LanguageBind:
    that keeps the identity start, and it starts random rather than zero, because attention without it is
    blind to frame order. With a zero-initialised embedding in the residual stream, a probe on the tower told
    horizontal from vertical motion and spinning from moving after 1200 steps, but left from right and up
    from down at chance (docs/crossmodal.md)."""

    def __init__(self, dim: int, heads: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.norm = nn.LayerNorm(dim)
        self.frame_embedding = nn.Parameter(torch.randn(1, frames, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B * frames, N, D) in frame-major order, as VideoLlava flattens videos -> same shape."""
        bt, n, d = hidden.shape
        if bt % self.frames:
            raise ValueError(f"the video tower got {bt} images, not a multiple of {self.frames} frames per clip")
        x = hidden.unflatten(0, (bt // self.frames, self.frames)).transpose(1, 2).reshape(-1, self.frames, d)
        y = self.norm(x) + self.frame_embedding.to(x.dtype)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x.reshape(bt // self.frames, n, self.frames, d).transpose(1, 2).reshape(bt, n, d)


def _before_layer(layer: nn.Module, args: tuple, kwargs: dict):
    if args:
        return (layer.temporal(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": layer.temporal(kwargs["hidden_states"])}


def add_temporal_attention(tower: nn.Module, frames: int) -> None:
    """Give every encoder layer of a transformers CLIP vision tower a `temporal` mixer run before it."""
    cfg = tower.config
    for layer in tower.encoder.layers:
        layer.temporal = TemporalMixer(cfg.hidden_size, cfg.num_attention_heads, frames)
        layer.register_forward_pre_hook(_before_layer, with_kwargs=True)
