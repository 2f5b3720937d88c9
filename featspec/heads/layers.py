"""Plain-PyTorch building blocks of a draft head: RMSNorm, RoPE, attention with a growable KV cache, MLP.

A head is one decoder layer, so it does not need transformers' modeling code; owning these few lines
lets the same attention run the training-time-test pattern (many draft steps, one cache) and tree
drafting (an explicit boolean mask over cached + new positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadConfig:
    """Shapes of a one-layer LLaMA-style draft head (names follow HF LlamaConfig)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    vocab_size: int = 0  # the target's vocabulary
    draft_vocab_size: int = 0  # EAGLE-3: size of the head's own LM head (0 for EAGLE-1)
    target_hidden_size: int = 0  # the target's hidden size (EAGLE-3 fc input is 3x this)
    target_num_layers: int = 0  # the target's decoder layer count, to validate and pick fusion layers
    # EAGLE-3: the residual stream starts from hidden_norm(fc(h)) (True) or from fc(h) itself (False, the
    # official EAGLE-3 code and the default vLLM / SGLang assume when config.json does not say)
    norm_before_residual: bool = False

    @classmethod
    def from_target(cls, cfg, draft_vocab_size: int = 0) -> "HeadConfig":
        """Head shapes copied from the target's text config, as the EAGLE papers do."""
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        theta = theta or getattr(cfg, "rope_theta", None) or 10000.0
        heads = cfg.num_attention_heads
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=cfg.hidden_size,
            target_num_layers=cfg.num_hidden_layers,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (B, heads, T, D) by positions (B, T) with the LLaMA half-split convention."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[..., None] * inv  # (B, T, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@dataclass
class KVCache:
    """K/V of one attention layer for one sequence; rows are head positions in the order fed."""

    keys: torch.Tensor | None = None  # (B, kv_heads, S, D)
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], -2)
        self.values = v if self.values is None else torch.cat([self.values, v], -2)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys = self.keys[..., :length, :]
            self.values = self.values[..., :length, :]


class Attention(nn.Module):
    """Multi-head attention with grouped K/V; q/k/v read `in_dim` features (2H for EAGLE-3)."""

    def __init__(self, cfg: HeadConfig, in_dim: int):
        super().__init__()
        self.cfg = cfg
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_dim, h * d, bias=False)
        self.k_proj = nn.Linear(in_dim, kv * d, bias=False)
        self.v_proj = nn.Linear(in_dim, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """Rotated q (B, h, T, D) and k, v (B, h, T, D) with K/V heads repeated to the query heads."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def expand_kv(self, k: torch.Tensor) -> torch.Tensor:
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        return k if rep == 1 else k.repeat_interleave(rep, dim=1)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` (T, S) bool over [cached keys, new keys], True = may attend; None = causal over the new ones."""
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        k, v = self.expand_kv(k), self.expand_kv(v)
        if mask is None:
            past = k.shape[-2] - q.shape[-2]
            if past == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                t = q.shape[-2]
                allowed = torch.ones(t, past + t, dtype=torch.bool, device=x.device)
                allowed[:, past:] = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


    def forward_ttt(self, x: torch.Tensor, positions: torch.Tensor, past: list) -> torch.Tensor:
        """Training-time test: attention of draft step j = len(past) over all T positions at once.

        Query (step j, index t) sees step 0 (real features) at indices <= t - j and step i's entry at
        index t - j + i for 1 <= i <= j: exactly what drafting j tokens past the last real feature
        sees. `past` holds (k, v) of earlier steps and gains this step's.
        """
        q, k, v = self.qkv(x, positions)
        past.append((self.expand_kv(k), self.expand_kv(v)))
        j = len(past) - 1
        t = q.shape[-2]
        scale = q.shape[-1] ** -0.5
        k0, v0 = past[0]
        idx = torch.arange(t, device=x.device)
        scores = [(q @ k0.transpose(-1, -2) * scale).masked_fill(idx[None, :] > idx[:, None] - j, float("-inf"))]
        shifted_v = []
        for i in range(1, j + 1):
            lag = j - i
            ki, vi = past[i]
            if lag:
                ki = F.pad(ki, (0, 0, lag, 0))[..., :t, :]
                vi = F.pad(vi, (0, 0, lag, 0))[..., :t, :]
            s = (q * ki).sum(-1, keepdim=True) * scale
            scores.append(s.masked_fill((idx < lag)[:, None], float("-inf")))
            shifted_v.append(vi)
        probs = torch.cat(scores, -1).float().softmax(-1).to(q.dtype)
        out = probs[..., :t] @ v0
        for i, vi in enumerate(shifted_v):
            out = out + probs[..., t + i : t + i + 1] * vi
        b = out.shape[0]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
