"""TargetModel: one HF causal LM driven as prefill -> verify(tree) -> commit(path).

No modeling file is forked: a tree is scored by passing the model a 4D additive attention mask
(each node sees the committed prefix and its own ancestors) plus explicit position ids (prefix length
+ node depth). Sliding-window models get a per-layer-type mask dict instead, and every model uses a
plain DynamicCache (full length on every layer) so the custom mask always matches the key length.
After acceptance the cache keeps exactly the committed tokens (index_select along the sequence axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from featspec.models.kv import cache_kwargs, select_cache, truncate_cache


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # (n, V): target logits at each tree node; (1, V) after prefill (last position only)
    hidden: tuple[torch.Tensor, ...] | None  # per layer (n, H) when requested (index 0 = embeddings)


class TargetModel:
    """Owns the KV cache of the committed tokens of one sequence (batch size 1)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        layer_types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window: int | None = window if window and "sliding_attention" in layer_types else None
        self.max_length: int = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        self.cache: DynamicCache | None = None
        self.length = 0  # committed tokens whose K/V are in the cache

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward(self, ids: list[int], position_ids: torch.Tensor | None, mask, hidden: bool, keep: int = 0,
                 extra: dict | None = None):
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=mask,
            position_ids=position_ids,
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=keep,
            **(extra or {}),
        )
        hs = tuple(h[0] for h in out.hidden_states) if hidden else None
        return out.logits[0], hs

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], hidden: bool = False, extra: dict | None = None) -> VerifyOutput:
        """Start a sequence: cache the prompt; return the last position's logits and every position's features.

        Only the last row of logits is computed: on a 262k vocabulary the LM head over a long prompt
        would otherwise cost more than the transformer layers. `extra` carries model inputs only the
        prompt has, e.g. a VLM's `pixel_values_videos` (its placeholder ids sit in `prompt_ids`).
        """
        self.cache = DynamicCache()
        self.length = 0
        logits, hs = self._forward(prompt_ids, None, None, hidden, keep=1, extra=extra)
        self.length = len(prompt_ids)
        return VerifyOutput(logits, hs)

    def tree_mask(self, tree) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive float mask (1, 1, n, length + n); a dict per layer type for sliding-window models."""
        n, past = len(tree), self.length
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        allowed[:, past:] = tree.ancestor_matrix(self.device)
        neg = torch.finfo(self.dtype).min

        def additive(ok: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ok.shape, dtype=self.dtype, device=self.device).masked_fill(~ok, neg)[None, None]

        if self.sliding_window is None:
            return additive(allowed)
        depth = torch.tensor(tree.depths, device=self.device)
        q_pos = past + depth
        k_pos = torch.cat([torch.arange(past, device=self.device), q_pos])
        near = (q_pos[:, None] - k_pos[None, :]) < self.sliding_window
        return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & near)}

    @torch.inference_mode()
    def verify(self, tree, hidden: bool = False) -> VerifyOutput:
        """Score every node of `tree` (node 0 = newest committed token) in one forward."""
        if self.cache is None:
            raise RuntimeError("verify() before prefill()")
        if tree.is_chain():  # the model's own causal mask is exact for a chain and cheaper to build
            positions, mask = None, None
        else:
            positions = (self.length + torch.tensor(tree.depths, device=self.device))[None]
            mask = self.tree_mask(tree)
        logits, hs = self._forward(tree.tokens, positions, mask, hidden)
        return VerifyOutput(logits, hs)

    def rollback(self) -> None:
        """Drop whatever a verify added beyond the committed tokens (used to time verifies in place)."""
        truncate_cache(self.cache, self.length)

    def commit(self, path: list[int]) -> None:
        """Keep the prefix plus the accepted tree nodes `path` (node indices, root first) in the cache."""
        if path == list(range(len(path))):
            truncate_cache(self.cache, self.length + len(path))
        else:
            keep = torch.cat(
                [torch.arange(self.length, device=self.device), self.length + torch.tensor(path, device=self.device)]
            )
            select_cache(self.cache, keep)
        self.length += len(path)
