"""Cross-modal drafting: an event VLM drafts for a video VLM (same tokenizer) from its own features.

The drafter keeps its own KV cache over its event prompt and the committed tokens, decodes a chain, and
turns each of its features into a draft distribution either with its own LM head (`xmodal-token`) or
through an adapter into the target's feature space and the target's LM head (`xmodal-L1..L6`). Cache
sync is ModelDrafter's: keep the prefix shared with the committed tokens, feed the rest.
"""

from __future__ import annotations

import torch
from featspec.crossmodal.adapters import Adapter
from featspec.crossmodal.eventchat import EVENT_TOKEN_INDEX
from featspec.drafters.base import DraftContext
from featspec.drafters.small_model import ModelDrafter
from featspec.models.kv import truncate_cache
from featspec.models.target import VerifyOutput


class CrossModalDrafter(ModelDrafter):
    name = "xmodal"

    def __init__(self, drafter, prompt_ids: list[int], event_pixels: torch.Tensor, target_head: torch.nn.Module,
                 adapter: Adapter | None = None, draft_length: int = 4, video_token_id: int | None = None):
        super().__init__(drafter.model, draft_length)
        if prompt_ids.count(EVENT_TOKEN_INDEX) != 1:
            raise ValueError("the drafter prompt needs exactly one event placeholder (-200)")
        self.vlm = drafter
        self.prompt = list(prompt_ids)
        self.pixels = event_pixels
        self.adapter = adapter
        self.target_head = target_head
        self.video_token_id = video_token_id
        self.expand = drafter.visual_tokens - 1  # cache entries beyond one per token, once the prompt is in
        self.offset = 0  # target prompt length: ctx.tokens[offset:] are the committed answer tokens
        self.feats: list[torch.Tensor] = []  # drafter features of cached answer-region positions (history adapters)
        self.tokens_in: list[int] = []  # the token at each of those positions
        self.visual: torch.Tensor | None = None

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        super().start(prompt_ids, prefill)
        self.offset = len(prompt_ids)
        self.feats, self.tokens_in = [], []
        if self.adapter is not None and self.adapter.needs_visual:
            if prefill.hidden is None or self.video_token_id is None:
                raise ValueError("L6 needs the target's prefill features: set wants_hidden and video_token_id")
            ids = torch.tensor(prompt_ids, device=prefill.hidden[-1].device)
            self.visual = prefill.hidden[-1][ids == self.video_token_id][None]

    @property
    def wants_hidden(self) -> bool:  # only L6 reads the target's states (its visual tokens, once)
        return self.adapter is not None and self.adapter.needs_visual

    def _tokens(self, ctx: DraftContext) -> list[int]:
        return self.prompt + ctx.tokens[self.offset:]

    def _truncate(self, keep: int) -> None:
        truncate_cache(self.cache, keep + self.expand)
        answer_keep = max(0, keep - len(self.prompt) + 1)  # positions from the last prompt token on
        del self.feats[answer_keep:]
        del self.tokens_in[answer_keep:]

    @torch.inference_mode()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        model = self.vlm.model
        if not self.cached:  # prefill: the event prompt (plus any committed tokens) in one forward
            x = torch.tensor([ids], device=self.device)
            emb = model.embed_with_events(x, self.pixels.to(self.device))
            out = model.model(inputs_embeds=emb, past_key_values=self.cache, use_cache=True)
            first = len(self.prompt) - 1  # features from the last prompt position on
            h = out.last_hidden_state[0, first + self.expand:]
            fed = ids[first:]
        else:
            out = model.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache, use_cache=True)
            h = out.last_hidden_state[0]
            fed = ids
        self.cached.extend(ids)
        self.feats.extend(h.unbind(0))
        self.tokens_in.extend(fed)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        """Draft logits for the next token from the newest feature."""
        if self.adapter is None:
            return self.vlm.model.lm_head(self.feats[-1])
        if self.adapter.needs_history:
            feats = torch.stack(self.feats)[None]
            toks = torch.tensor([self.tokens_in], device=feats.device)
        else:
            feats, toks = self.feats[-1][None, None], None
        mapped = self.adapter(feats.to(next(self.adapter.parameters()).dtype), toks, self.visual)[0, -1]
        return self.target_head(mapped.to(self.target_head.weight.dtype))
