"""Block head: all k draft distributions of a step from one head forward (DFlash-style drafting).

Why: an EAGLE-3 head drafts serially, one head forward per tree level, and each level feeds on its own
drifting features. A block head proposes the next k tokens at once.

It is a trained EAGLE-3 head (fusion `fc`, decoder layer, norm, draft vocabulary: position 0 of the block is
exactly EAGLE-3's first level) plus a second decoder layer of the same shape for the k-1 positions whose token
and target feature are not known yet (`slot_layer`, started from the EAGLE-3 layer).

Slot inputs (docs/block.md tells the measurements behind each):
- chained (`chain`, the default for new heads): every slot reads the EAGLE-3 layer's output at the newest
  entry (the feature EAGLE-3 would feed its second level) plus a learned offset (`mask_feat[i-1]`); slot 1's
  input embedding is the embedding of position 0's top draft token, later slots' are learned (`mask_embed`).
  Slot 1 therefore starts as EAGLE-3's second level on the top-1 path, and the later slots see it.
- unchained (heads trained before, `chain: false` in their config): slot i reads the newest committed feature
  plus `mask_feat[i-1]` and a learned embedding `mask_embed[i-1]`. After 636 steps its slot 1 agreed with the
  target 22 % of the time, against EAGLE-3's 66 % at its second level.
(A first version fed the slots constant learned vectors through the shared layer: after 100 steps its slots
agreed with the target 3-7 % of the time and position 0 fell from 0.751 to 0.706.)

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
                 block_size: int = 8, chain: bool = True):
        super().__init__(cfg, layer_ids, num_fused)
        if block_size < 2:
            raise ValueError(f"a block head drafts >= 2 positions per forward, got block_size {block_size}")
        self.block_size = block_size
        self.chain = chain
        h = cfg.hidden_size
        self.slot_layer = Eagle3Layer(cfg)
        self.mask_feat = nn.Parameter(torch.zeros(block_size - 1, h))
        # chained: slot 1's input embedding is position 0's top token, so only the later slots learn one
        self.mask_embed = nn.Parameter(torch.zeros(block_size - 1 - chain, h))

    def new_keys(self, state: dict) -> list[str]:
        """Keys of this head that `state` (an EAGLE-3 head's) lacks: they start fresh."""
        return [k for k in self.state_dict() if k.startswith(self.NEW_PREFIXES) and k not in state]

    @torch.no_grad()
    def init_slots(self, embeds: torch.Tensor) -> None:
        """Fresh slots: the slot layer starts as a copy of the trained EAGLE-3 layer (so a chained slot 1 starts as
        EAGLE-3's second level), the feature offsets at zero, the learned input embeddings at the mean real one."""
        self.slot_layer.load_state_dict(self.midlayer.state_dict())
        self.mask_feat.zero_()
        self.mask_embed.copy_(embeds.float().mean(0).expand_as(self.mask_embed).to(self.mask_embed))

    def base_parameters(self) -> list[nn.Parameter]:
        """The EAGLE-3 part (fusion, first layer, norm, LM head): frozen when only the slots train."""
        own = {id(p) for p in (*self.slot_layer.parameters(), self.mask_feat, self.mask_embed)}
        return [p for p in self.parameters() if id(p) not in own]

    def new_cache(self) -> BlockCache:
        return BlockCache()

    def slot_inputs(self, newest: torch.Tensor, first: torch.Tensor, first_logits: torch.Tensor | None,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and input embeddings (..., n, H) of n slots after a committed entry whose fused feature is
        `newest` (..., H), whose EAGLE-3 layer output is `first` and (chained) whose position-0 draft logits are
        `first_logits` (..., V)."""
        if not self.chain:
            feats = newest[..., None, :] + self.mask_feat[:n].to(newest.dtype)
            return feats, self.mask_embed[:n].to(newest.dtype).expand(*newest.shape[:-1], n, -1)
        feats = first[..., None, :] + self.mask_feat[:n].to(first.dtype)
        top = self.embed(self.to_target_ids(first_logits.argmax(-1))).to(first.dtype)[..., None, :]
        rest = self.mask_embed[:n - 1].to(first.dtype).expand(*first.shape[:-1], n - 1, -1)
        return feats, torch.cat([top, rest], -2)

    def draft(self, feats: torch.Tensor, tokens: torch.Tensor, start: int, cache: BlockCache,
              k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward: the m pending committed entries (feats (m, H), tokens (m,), positions from `start`) enter
        the caches for good; returns k head outputs (k, H), output i drafting the token i+1 places after the
        newest committed one, and (chained) position 0's logits (1, V), computed on the way."""
        m, dev = feats.shape[0], feats.device
        past = cache.length
        embeds = self.embed(tokens[None]).to(feats.dtype)
        positions = torch.arange(start, start + m + k - 1, device=dev)[None]
        first = self.run_layer(self.midlayer, feats[None], embeds, positions[:, :m], cache.main, None)[0, -1:]
        first_logits = self.logits(first) if self.chain else None
        slot_f, slot_e = self.slot_inputs(feats[-1:], first, first_logits, k - 1)
        n = m + k - 1
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=dev)
        allowed[:m, past:past + m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        allowed[:m, past + m:] = False  # committed entries never see the slots
        out = self.run_layer(self.slot_layer, torch.cat([feats, slot_f[0]])[None], torch.cat([embeds[0], slot_e[0]])[None],
                             positions, cache.slots, allowed[None, None])[0]
        cache.truncate(past + m)
        return torch.cat([first, out[m:]]), first_logits
