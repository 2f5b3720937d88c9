"""Block head: all k draft distributions of a step from one head forward (DFlash-style drafting).

Why: an EAGLE-3 head drafts serially, one head forward per tree level, and each level feeds on its own
drifting features. A block head proposes the next k tokens at once. Its one decoder layer is EAGLE-3's (it
starts from a trained EAGLE-3 head: same fusion `fc`, layer, norm and draft vocabulary); what it adds are k-1
learned mask slots, each a (feature, input embedding) pair standing in for a position whose token and target
feature are not known yet.

One drafting forward reads the committed (feature t, token t+1) entries not yet in its cache (causal, kept)
and the block: entry 0 is the newest committed pair (it predicts the next token, exactly as EAGLE-3's first
level does: committed entries never see the slots), entries 1..k-1 are the mask slots at the following
positions, which attend bidirectionally among themselves and to every committed entry. Output i is the draft
distribution of the token i+1 places after the root.
"""

from __future__ import annotations

import torch
from torch import nn

from featspec.heads.eagle3 import Eagle3Head
from featspec.heads.layers import HeadConfig, KVCache


class BlockHead(Eagle3Head):
    kind = "block"

    def __init__(self, cfg: HeadConfig, layer_ids: tuple[int, ...] | None = None, num_fused: int = 3,
                 block_size: int = 6):
        super().__init__(cfg, layer_ids, num_fused)
        if block_size < 2:
            raise ValueError(f"a block head drafts >= 2 positions per forward, got block_size {block_size}")
        self.block_size = block_size
        h = cfg.hidden_size
        self.mask_feat = nn.Parameter(torch.zeros(block_size - 1, h))
        self.mask_embed = nn.Parameter(torch.zeros(block_size - 1, h))

    # parameters a block head adds to the EAGLE-3 head it may start from (`--init-from` an eagle3 head)
    NEW_KEYS = ("mask_feat", "mask_embed")

    @torch.no_grad()
    def init_masks(self, feats: torch.Tensor, embeds: torch.Tensor) -> None:
        """Start every mask slot from the mean (feature, embedding) of real entries: inputs of the scale the
        layer was trained on, so the first steps refine a sensible guess instead of reading zeros."""
        self.mask_feat.copy_(feats.float().mean(0).expand_as(self.mask_feat).to(self.mask_feat))
        self.mask_embed.copy_(embeds.float().mean(0).expand_as(self.mask_embed).to(self.mask_embed))

    def layer(self, feats: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
              mask: torch.Tensor | None) -> torch.Tensor:
        """The decoder layer over (feature, input embedding) pairs: EAGLE-3's, with embeddings given directly."""
        layer = self.midlayer
        normed = layer.hidden_norm(feats)
        residual = normed if self.cfg.norm_before_residual else feats
        x = torch.cat([layer.input_layernorm(embeds.to(feats.dtype)), normed], -1)
        x = residual + layer.self_attn(x, positions, cache, mask)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def slots(self, n: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and input embeddings of the first n mask slots, (batch, n, H) each."""
        return self.mask_feat[:n].expand(batch, n, -1), self.mask_embed[:n].expand(batch, n, -1)

    def draft(self, feats: torch.Tensor, tokens: torch.Tensor, start: int, cache: KVCache, k: int) -> torch.Tensor:
        """One forward: the m pending committed entries (feats (m, H), tokens (m,), cache positions from
        `start`) enter the cache for good; with k-1 mask slots after them, returns k head outputs (k, H):
        output i drafts the token i+1 places after the newest committed one. The slots leave the cache again."""
        m, dev = feats.shape[0], feats.device
        past = cache.length
        slot_f, slot_e = self.slots(k - 1)
        x_f = torch.cat([feats[None], slot_f.to(feats.dtype)], 1)
        x_e = torch.cat([self.embed(tokens[None]).to(feats.dtype), slot_e.to(feats.dtype)], 1)
        positions = torch.arange(start, start + m + k - 1, device=dev)[None]
        n = m + k - 1
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=dev)
        allowed[:m, past:past + m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        allowed[:m, past + m:] = False  # committed entries never see the mask slots
        out = self.layer(x_f, x_e, positions, cache, allowed[None, None])[0]
        cache.truncate(past + m)
        return out[m - 1:]
