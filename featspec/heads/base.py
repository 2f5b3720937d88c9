"""DraftHead: what every feature-level head (EAGLE-1, EAGLE-3) offers the drafter and the trainer.

A head reads target hidden states (`fuse`), then runs one decoder layer over pairs
(feature of position t, embedding of token t+1) and returns its own feature for position t, which
`logits` turns into a distribution over the next-next token. Drafting feeds a head's output feature
back in as the next pair's feature, so `forward` takes features already in head space.

The target's embedding (and, for EAGLE-1, its LM head) is shared, not owned: `bind` keeps a
reference outside the module tree so it is neither trained nor saved.
"""

from __future__ import annotations

import torch
from torch import nn

from featspec.heads.layers import HeadConfig, KVCache


class DraftHead(nn.Module):
    kind = "base"

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self._shared: dict[str, nn.Module] = {}

    # --- wiring to the target -------------------------------------------------------------
    def bind(self, target: nn.Module) -> "DraftHead":
        """Use the target's input embedding (and LM head where the head has none of its own)."""
        self._shared = {"embed": target.get_input_embeddings(), "lm_head": target.get_output_embeddings()}
        return self

    @property
    def bound(self) -> bool:
        return "embed" in self._shared

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.bound:
            raise RuntimeError("call head.bind(target_model) before using the head")
        return self._shared["embed"](tokens)

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Indices into HF `hidden_states` (0 = embeddings) the head reads."""
        raise NotImplementedError

    # --- the head proper ----------------------------------------------------------------------
    def fuse(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Target hidden states (one tensor per `layer_ids` entry, (..., T, H_target)) -> head features."""
        raise NotImplementedError

    def forward(
        self,
        feats: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, H) features + (B, T) next tokens -> (B, T, H) head features of the following position."""
        raise NotImplementedError

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the head's draft vocabulary."""
        raise NotImplementedError

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids (identity for full-vocabulary heads)."""
        return draft_ids

    @staticmethod
    def attend(attn, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, mask, ttt_past: list | None):
        """The layer's attention in drafting mode (cache + mask) or training-time-test mode (ttt_past)."""
        if ttt_past is not None:
            return attn.forward_ttt(x, positions, ttt_past)
        return attn(x, positions, cache, mask)

    def new_cache(self) -> KVCache:
        return KVCache()
