"""Cross-modal drafting: an event VLM drafts for a video VLM (same tokenizer) from its own features.

The drafter keeps its own KV cache over its event prompt and the committed tokens, decodes a chain, and
turns each of its features into a draft distribution either with its own LM head (`xmodal-token`) or
through an adapter into the target's feature space and the target's LM head (`xmodal-L1..L6`). The chain
and cache sync are the core's (`ModelDrafter` over a `CachedLM`): `EventLM` is the cached LM whose sequence is
its own event prompt plus the committed answer, and whose prompt expands into many cache entries.
"""

from __future__ import annotations

import threading
import time

import torch

from featspec.xmodal.drafting.adapters import Adapter
from featspec.xmodal.models.eventchat import EVENT_TOKEN_INDEX
from featspec.protocol import DraftContext
from featspec.drafters.small_model import CachedLM, ModelDrafter
from featspec.models.kv import cache_kwargs, truncate_cache
from featspec.models.target import VerifyOutput
from featspec.tree import DraftTree


class EventLM(CachedLM):
    """The event VLM as a cached LM: conditions on its own prompt + the target's committed answer tokens."""

    def __init__(self, vlm, prompt_ids: list[int], event_pixels: torch.Tensor, target_head: torch.nn.Module,
                 adapter: Adapter | None):
        super().__init__(vlm.model)
        if prompt_ids.count(EVENT_TOKEN_INDEX) != 1:
            raise ValueError("the drafter prompt needs exactly one event placeholder (-200)")
        self.vlm = vlm
        self.prompt = list(prompt_ids)
        self.pixels = event_pixels
        self.adapter = adapter
        self.target_head = target_head
        self.expand = vlm.visual_tokens - 1  # cache entries beyond one per token, once the prompt is in
        self.offset = 0  # target prompt length: the target's tokens[offset:] are the committed answer tokens
        self.feats: list[torch.Tensor] = []  # drafter features of cached answer-region positions (history adapters)
        self.tokens_in: list[int] = []  # the token at each of those positions
        self.visual: torch.Tensor | None = None  # the target's visual-token states (L6 only)
        self.prefill_s = 0.0  # time in the drafter's own prefill forwards (inside drafting, or overlapped)

    def reset(self, prompt_ids: list[int]) -> None:
        super().reset(prompt_ids)
        self.offset = len(prompt_ids)
        self.feats, self.tokens_in, self.prefill_s = [], [], 0.0

    def sequence(self, tokens: list[int]) -> list[int]:
        return self.prompt + tokens[self.offset:]

    def truncate(self, keep: int) -> None:
        truncate_cache(self.cache, keep + self.expand)
        answer_keep = max(0, keep - len(self.prompt) + 1)  # positions from the last prompt token on
        del self.feats[answer_keep:]
        del self.tokens_in[answer_keep:]

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        model = self.vlm.model
        if not self.cached:  # prefill: the event prompt (plus any committed tokens) in one forward
            t0 = time.perf_counter()
            x = torch.tensor([ids], device=self.device)
            emb = model.embed_with_events(x, self.pixels.to(self.device))
            out = model.model(inputs_embeds=emb, **cache_kwargs(model.model, self.cache), use_cache=True)
            self.prefill_s += time.perf_counter() - t0
            first = len(self.prompt) - 1  # features from the last prompt position on
            h = out.last_hidden_state[0, first + self.expand:]
            fed = ids[first:]
        else:
            out = model.model(input_ids=torch.tensor([ids], device=self.device), **cache_kwargs(model.model, self.cache), use_cache=True)
            h = out.last_hidden_state[0]
            fed = ids
        self.cached.extend(ids)
        self.feats.extend(h.unbind(0))
        self.tokens_in.extend(fed)
        return self.logits()

    def logits(self) -> torch.Tensor:
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


class CrossModalDrafter(ModelDrafter):
    """The event drafter's chain, with an optional parallel prefill: `begin` runs the drafter's prefill and
    drafts ahead in a thread while the target prefills; `start` waits for it."""

    name = "xmodal"

    def __init__(self, drafter, prompt_ids: list[int], event_pixels: torch.Tensor, target_head: torch.nn.Module,
                 adapter: Adapter | None = None, draft_length: int = 4, video_token_id: int | None = None,
                 parallel: bool = False):
        super().__init__(EventLM(drafter, prompt_ids, event_pixels, target_head, adapter), draft_length)
        if parallel and adapter is not None and adapter.needs_visual:
            raise ValueError("parallel prefill cannot use L6: it reads the target's prefill, which is still running")
        self.adapter = adapter
        self.video_token_id = video_token_id
        self.parallel = parallel
        self.ahead: list[int] = []  # tokens drafted during the target's prefill, first one predicts its first token
        self.timeline: dict[str, tuple[float, float]] = {}  # phase -> (start, end) perf_counter seconds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def prefill_s(self) -> float:
        return self.lm.prefill_s

    @property
    def wants_hidden(self) -> bool:  # only L6 reads the target's states (its visual tokens, once)
        return self.adapter is not None and self.adapter.needs_visual

    def begin(self, prompt_ids: list[int]) -> None:
        """Called by the engine before the target's prefill: with `parallel`, prefill and draft ahead in a thread."""
        if not self.parallel:
            return
        self.lm.reset(prompt_ids)
        self.ahead, self._error = [], None
        t0 = time.perf_counter()
        lm = self.lm

        def work() -> None:
            try:
                logits = lm.feed(lm.prompt)
                self.timeline["drafter_prefill"] = (t0, time.perf_counter())
                for i in range(self.draft_length + 1):
                    self.ahead.append(int(logits.argmax()))
                    if i < self.draft_length:
                        logits = lm.feed([self.ahead[-1]])
                self.timeline["draft_ahead"] = (self.timeline["drafter_prefill"][1], time.perf_counter())
            except BaseException as e:  # re-raised in start(), on the engine's thread
                self._error = e

        self.timeline = {}
        self._thread = threading.Thread(target=work, name="xmodal-parallel-prefill", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """The target's prefill failed: wait for the parallel work (a prefill and a few tokens) and drop it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.ahead, self._error = [], None

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        if self._thread is not None:  # parallel prefill: wait for the drafter, keep its cache and drafts
            wait = time.perf_counter()
            self._thread.join()
            self._thread = None
            self.timeline["wait_for_drafter"] = (wait, time.perf_counter())
            if self._error is not None:
                raise self._error
        else:
            self.lm.reset(prompt_ids)
            self.ahead = []
        if self.adapter is not None and self.adapter.needs_visual:
            if prefill.hidden is None or self.video_token_id is None:
                raise ValueError("L6 needs the target's prefill features: set wants_hidden and video_token_id")
            ids = torch.tensor(prompt_ids, device=prefill.hidden[-1].device)
            self.lm.visual = prefill.hidden[-1][ids == self.video_token_id][None]

    def propose(self, ctx: DraftContext) -> DraftTree:
        """The first step after a parallel prefill proposes the drafts made ahead, if they start right."""
        ahead, self.ahead = self.ahead, []
        steps = min(self.draft_length, ctx.max_depth)
        if ahead and steps >= 1 and len(ctx.tokens) == self.lm.offset + 1 and ahead[0] == ctx.tokens[-1]:
            return DraftTree.chain(ctx.tokens[-1], ahead[1: 1 + steps])
        return super().propose(ctx)
