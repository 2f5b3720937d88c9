"""EAGLE-1 head: regress the target's next feature from (feature, next token).

`fc(cat[embed(x_{t+1}), f_t]) -> H`, one LLaMA decoder layer without an input norm, output f_{t+1}
in the target's own feature space (the last hidden state, after the final norm), so the target's
frozen LM head turns it into tokens. Tensor names follow the official EAGLE-1 checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from featspec.heads.base import DraftHead
from featspec.heads.layers import MLP, Attention, HeadConfig, KVCache, RMSNorm


class Eagle1Layer(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Eagle1Head(DraftHead):
    kind = "eagle1"

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([Eagle1Layer(cfg)])

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return (self.cfg.target_num_layers,)  # HF hidden_states[-1]: after the final norm

    def fuse(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        return hidden_states[-1]

    def forward(self, feats, tokens, positions, cache: KVCache | None = None, mask=None, ttt_past: list | None = None):
        layer = self.layers[0]
        x = self.fc(torch.cat([self.embed(tokens).to(feats.dtype), feats], -1))
        x = x + self.attend(layer.self_attn, x, positions, cache, mask, ttt_past)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        lm_head = self._shared["lm_head"]
        return lm_head(out.to(lm_head.weight.dtype))
