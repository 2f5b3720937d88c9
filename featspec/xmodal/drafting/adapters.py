"""Adapters L1-L6: map the event drafter's features into the video target's LM-head input space.

Every level has one signature, `forward(feats (B, T, Hd), tokens (B, T), visual (B, Nv, Ht) | None)
-> (B, T, Ht)`, causal along T (answer positions), so training and drafting share it. Widths scale with
the hidden size H as in the level table of docs/crossmodal.md.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = ("L1", "L2", "L3", "L4", "L5", "L6")


def _causal(t: int, device) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(1)  # True = masked


class Bottleneck(nn.Module):
    """LayerNorm, Linear(H -> H/r), GELU, dropout, Linear(-> H), residual scaled by a learnable alpha."""

    def __init__(self, d_in: int, d_out: int, inner: list[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        dims = [d_in, *inner, d_out]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.alpha * self.mlp(self.norm(x))


class Adapter(nn.Module):
    """Base: `level`, the per-position map, and what the drafter must keep (history, visual features)."""

    level = "?"
    needs_history = False  # output at t depends on positions < t
    needs_visual = False  # reads the target's cached visual features

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out


class L1(Adapter):
    level = "L1"

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__(d_in, d_out)
        self.block = Bottleneck(d_in, d_out, [max(8, d_in // 16)], dropout)

    def forward(self, feats, tokens=None, visual=None):
        return self.block(feats)


class L2(Adapter):
    level = "L2"

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__(d_in, d_out)
        self.blocks = nn.Sequential(Bottleneck(d_in, d_out, [max(8, d_in // 16)], dropout),
                                    *[Bottleneck(d_out, d_out, [max(8, d_out // 16)], dropout) for _ in range(2)])

    def forward(self, feats, tokens=None, visual=None):
        return self.blocks(feats)


class L3(Adapter):
    level = "L3"

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__(d_in, d_out)
        self.block = Bottleneck(d_in, d_out, [d_in // 4, d_in // 4], dropout)

    def forward(self, feats, tokens=None, visual=None):
        return self.block(feats)


class _Block(nn.Module):
    """Pre-norm attention (self, causal; or cross to `memory`) + FFN, both residual."""

    def __init__(self, d: int, heads: int, cross: bool, dropout: float) -> None:
        super().__init__()
        self.cross = cross
        self.n1 = nn.LayerNorm(d)
        self.nm = nn.LayerNorm(d) if cross else None
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.n2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        q = self.n1(x)
        if self.cross:
            kv = self.nm(memory)
            a, _ = self.attn(q, kv, kv, need_weights=False)
        else:
            a, _ = self.attn(q, q, q, attn_mask=_causal(x.shape[1], x.device), need_weights=False)
        x = x + a
        return x + self.ffn(self.n2(x))


def _heads(d: int) -> int:
    return max(1, d // 64)


class _AttentionAdapter(Adapter):
    """L4 and L6: input map, one attention block (causal self or cross), residual scaled by alpha."""

    cross = False

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__(d_in, d_out)
        self.inp = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)
        self.block = _Block(d_out, _heads(d_out), cross=self.cross, dropout=dropout)
        self.out = nn.LayerNorm(d_out)
        self.alpha = nn.Parameter(torch.tensor(0.1))

    def _map(self, feats: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(feats)
        return x + self.alpha * self.out(self.block(x, None if memory is None else memory.to(x.dtype)))


class L4(_AttentionAdapter):
    level = "L4"
    needs_history = True

    def forward(self, feats, tokens=None, visual=None):
        return self._map(feats)


class L5(Adapter):
    """EAGLE-style: fc over [embed(token), feature], then a causal decoder layer. `embed` is the target's
    frozen input embedding, referenced, never trained or saved."""

    level = "L5"
    needs_history = True

    def __init__(self, d_in: int, d_out: int, embed: nn.Embedding | None = None, dropout: float = 0.1) -> None:
        super().__init__(d_in, d_out)
        self.fc = nn.Linear(d_out + d_in, d_out)
        self.block = _Block(d_out, _heads(d_out), cross=False, dropout=dropout)
        self.out = nn.LayerNorm(d_out)
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        self.alpha = nn.Parameter(torch.tensor(0.1))
        object.__setattr__(self, "embed", embed)  # not a submodule: stays out of state_dict and the optimizer

    def forward(self, feats, tokens=None, visual=None):
        if self.embed is None or tokens is None:
            raise ValueError("L5 needs the target's embedding (set .embed) and the input tokens")
        e = self.embed(tokens).to(feats.dtype)
        return self.skip(feats) + self.alpha * self.out(self.block(self.fc(torch.cat([e, feats], dim=-1))))


class L6(_AttentionAdapter):
    """Cross-modal attention: queries from drafter features, keys/values from the target's visual features."""

    level = "L6"
    needs_visual = True
    cross = True

    def forward(self, feats, tokens=None, visual=None):
        if visual is None:
            raise ValueError("L6 needs the target's visual features")
        return self._map(feats, visual)


CLASSES = {c.level: c for c in (L1, L2, L3, L4, L5, L6)}


def build_adapter(level: str, d_in: int, d_out: int, embed: nn.Embedding | None = None) -> Adapter:
    if level not in CLASSES:
        raise ValueError(f"unknown adapter level '{level}': use one of {', '.join(LEVELS)}")
    return CLASSES[level](d_in, d_out, embed=embed) if level == "L5" else CLASSES[level](d_in, d_out)


def adapter_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lm_head: nn.Module | None = None,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + (1 - cosine) over real positions, plus optional soft CE against the target's LM-head distribution."""
    p, t = pred[mask].float(), target[mask].float()
    mse = (p - t).pow(2).mean()
    cos = nn.functional.cosine_similarity(p, t, dim=-1).mean()
    loss = mse + (1 - cos)
    parts = {"mse": mse.item(), "cos": cos.item()}
    if ce_weight > 0 and lm_head is not None:
        with torch.no_grad():
            ref = torch.log_softmax(lm_head(t.to(lm_head.weight.dtype)).float(), -1).exp()
        ce = -(ref * torch.log_softmax(lm_head(p.to(lm_head.weight.dtype)).float(), -1)).sum(-1).mean()
        loss = loss + ce_weight * ce
        parts["ce"] = ce.item()
    return loss, parts
