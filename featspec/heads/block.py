"""Block head: all k draft distributions of a step from one head forward (DFlash-style drafting).

Why: an EAGLE-3 head drafts serially, one head forward per tree level, and each level feeds on its own
drifting features. A block head proposes the next k tokens at once.

It is a trained EAGLE-3 head (fusion `fc`, decoder layer, norm, draft vocabulary: position 0 of the block is
exactly EAGLE-3's first level) plus a second decoder layer of the same shape for the k-1 positions whose token
and target feature are not known yet (`slot_layer`, started from the EAGLE-3 layer). Slot i reads the newest
committed feature plus a learned offset (`mask_feat[i-1]`) and a learned input embedding (`mask_embed[i-1]`):
its residual stream starts from what the target knows at the newest position, not from a constant. (A first
version fed the slots constant learned vectors through the shared layer: after 100 steps its slots agreed with
the target 3-7 % of the time and position 0 fell from 0.751 to 0.706; docs/block.md.)

One drafting forward: the committed (feature t, token t+1) entries not yet cached enter both layers' caches for
good (causal); the EAGLE-3 layer's output of the newest one drafts the next token; the slots, at the following
positions, attend through `slot_layer` to every committed entry and bidirectionally among themselves, and
output i drafts the token i+1 places after the root. The slots leave the cache after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from featspec.heads.eagle3 import Eagle3Head, Eagle3Layer
from featspec.heads.layers import HeadConfig, KVCache


@dataclass
class BlockCache:
    """One K/V cache per layer, always the same length (the committed entries)."""

    main: KVCache = field(default_factory=KVCache)
    slots: KVCache = field(default_factory=KVCache)

    @property
    def length(self) -> int:
        return self.main.length

    def truncate(self, length: int) -> None:
        self.main.truncate(length)
        self.slots.truncate(length)


class BlockHead(Eagle3Head):
    kind = "block"

    # parameters a block head adds to the EAGLE-3 head it starts from (`--init-from` an eagle3 head)
    NEW_PREFIXES = ("slot_layer.", "mask_feat", "mask_embed")

    def __init__(self, cfg: HeadConfig, layer_ids: tuple[int, ...] | None = None, num_fused: int = 3,
                 block_size: int = 8):
        super().__init__(cfg, layer_ids, num_fused)
        if block_size < 2:
            raise ValueError(f"a block head drafts >= 2 positions per forward, got block_size {block_size}")
        self.block_size = block_size
        h = cfg.hidden_size
        self.slot_layer = Eagle3Layer(cfg)
        self.mask_feat = nn.Parameter(torch.zeros(block_size - 1, h))
        self.mask_embed = nn.Parameter(torch.zeros(block_size - 1, h))

    def new_keys(self, state: dict) -> list[str]:
        """Keys of this head that `state` (an EAGLE-3 head's) lacks: they start fresh."""
        return [k for k in self.state_dict() if k.startswith(self.NEW_PREFIXES) and k not in state]

    @torch.no_grad()
    def init_slots(self, embeds: torch.Tensor) -> None:
        """Fresh slots: the slot layer starts as a copy of the trained EAGLE-3 layer, the feature offsets at zero
        (the newest committed feature itself), the input embeddings at the mean real embedding."""
        self.slot_layer.load_state_dict(self.midlayer.state_dict())
        self.mask_feat.zero_()
        self.mask_embed.copy_(embeds.float().mean(0).expand_as(self.mask_embed).to(self.mask_embed))

    def base_parameters(self) -> list[nn.Parameter]:
        """The EAGLE-3 part (fusion, first layer, norm, LM head): frozen when only the slots train."""
        own = {id(p) for p in (*self.slot_layer.parameters(), self.mask_feat, self.mask_embed)}
        return [p for p in self.parameters() if id(p) not in own]

    def new_cache(self) -> BlockCache:
        return BlockCache()

    def slot_inputs(self, newest: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and input embeddings of n slots after committed features `newest` (..., H): (..., n, H)."""
        feats = newest[..., None, :] + self.mask_feat[:n].to(newest.dtype)
        embeds = self.mask_embed[:n].to(newest.dtype).expand(*newest.shape[:-1], n, -1)
        return feats, embeds

    def draft(self, feats: torch.Tensor, tokens: torch.Tensor, start: int, cache: BlockCache, k: int) -> torch.Tensor:
        """One forward: the m pending committed entries (feats (m, H), tokens (m,), positions from `start`) enter
        the caches for good; returns k head outputs (k, H), output i drafting the token i+1 places after the
        newest committed one."""
        m, dev = feats.shape[0], feats.device
        past = cache.length
        embeds = self.embed(tokens[None]).to(feats.dtype)
        positions = torch.arange(start, start + m + k - 1, device=dev)[None]
        first = self.run_layer(self.midlayer, feats[None], embeds, positions[:, :m], cache.main, None)[0, -1]
        slot_f, slot_e = self.slot_inputs(feats[-1], k - 1)
        n = m + k - 1
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=dev)
        allowed[:m, past:past + m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        allowed[:m, past + m:] = False  # committed entries never see the slots
        out = self.run_layer(self.slot_layer, torch.cat([feats, slot_f])[None], torch.cat([embeds[0], slot_e])[None],
                             positions, cache.slots, allowed[None, None])[0]
        cache.truncate(past + m)
        return torch.cat([first[None], out[m:]])
