"""`model`: classic speculative decoding with a separate small causal LM sharing the target's tokenizer.

The draft model keeps its own KV cache. Before proposing, the cache is cut back to the longest prefix
it shares with the committed tokens (so accepted drafts it already processed are reused) and the rest
is fed in one forward. It then drafts a chain: argmax when greedy, otherwise a sample from its
processed distribution q, which the tree records so verification applies min(1, p/q).

`layers:N` builds a self-draft: the target's first N decoder layers, its final norm and LM head,
sharing the target's weights (no copy, no training).
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from featspec.protocol import DraftContext, Drafter
from featspec.errors import FeatspecError
from featspec.models.kv import cache_kwargs, truncate_cache
from featspec.models.target import VerifyOutput
from featspec.sampling import process_logits, sample
from featspec.tree import DraftTree


def truncated_self_draft(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A view of `model` that runs only its first `num_layers` decoder layers (weights shared)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    total = len(body.layers)
    if not 1 <= num_layers < total:
        raise FeatspecError(f"layers:{num_layers} is out of range: the target has {total} layers, use 1..{total - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:num_layers]
    new_body = copy.copy(body)
    new_body._modules = dict(body._modules)  # own module dict, so the target keeps all its layers
    new_body.layers = torch.nn.ModuleList(list(body.layers)[:num_layers])
    new_body.config = cfg
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.config = cfg
    for name, child in model._modules.items():
        if child is body:
            draft._modules[name] = new_body
    return draft


class CachedLM:
    """A causal LM with its own KV cache over the tokens it has read: what a chain drafter drives.

    `sync` cuts the cache back to the longest prefix it shares with the sequence to condition on (so accepted
    drafts it already read are reused) and feeds the rest; `feed` reads more tokens. Subclasses with another
    input layout (the cross-modal drafter's event prompt) override `feed`, `truncate` and `sequence`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: DynamicCache | None = None
        self.cached: list[int] = []  # tokens whose K/V are in self.cache

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self, prompt_ids: list[int]) -> None:
        """A new prompt: an empty cache."""
        self.cache, self.cached = DynamicCache(), []

    def sequence(self, tokens: list[int]) -> list[int]:
        """The sequence this LM conditions on, given the target's (the same one, for an LM sharing its prompt)."""
        return tokens

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Read `ids` after what is cached; the next-token logits."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), **cache_kwargs(self.model, self.cache),
                         use_cache=True, logits_to_keep=1)
        self.cached.extend(ids)
        return out.logits[0, -1]

    def truncate(self, keep: int) -> None:
        """Drop cache entries past the first `keep` tokens (one entry per token here)."""
        truncate_cache(self.cache, keep)

    def sync(self, tokens: list[int]) -> torch.Tensor:
        """Cut the cache to the prefix shared with the target's `tokens`, feed the rest, return the last logits."""
        seq = self.sequence(tokens)
        keep = 0
        limit = min(len(self.cached), len(seq) - 1)  # always feed at least the newest token
        while keep < limit and self.cached[keep] == seq[keep]:
            keep += 1
        if keep < len(self.cached):
            self.truncate(keep)
            del self.cached[keep:]
        return self.feed(seq[keep:])


class ModelDrafter(Drafter):
    """A chain of `draft_length` tokens from a `CachedLM`: argmax when greedy, else sampled (q recorded)."""

    name = "model"

    def __init__(self, draft_model: torch.nn.Module | CachedLM, draft_length: int = 4):
        if draft_length < 1:
            raise FeatspecError(f"draft length must be >= 1, got {draft_length}")
        self.lm = draft_model if isinstance(draft_model, CachedLM) else CachedLM(draft_model)
        self.draft_length = draft_length

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        self.lm.reset(prompt_ids)

    def propose(self, ctx: DraftContext) -> DraftTree:
        steps = min(self.draft_length, ctx.max_depth)
        if steps < 1:
            return DraftTree.root(ctx.tokens[-1])
        logits = self.lm.sync(ctx.tokens)
        drafted: list[int] = []
        dists: list[torch.Tensor | None] = []
        for i in range(steps):
            if ctx.sampling.greedy:
                tok, q = int(logits.argmax()), None
            else:
                q = process_logits(logits, ctx.sampling)
                tok = sample(q, ctx.generator)
            drafted.append(tok)
            dists.append(q)
            if i + 1 < steps:
                logits = self.lm.feed([tok])
        return DraftTree.chain(ctx.tokens[-1], drafted, dists)
