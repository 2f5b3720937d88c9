"""`--lookup`: prompt-lookup continuations grafted onto another drafter's tree.

Small chat models repeat themselves (lists, code, loops), and what they repeat is in the context: an n-gram
match predicts many tokens at once where a feature head, trained a few steps ahead, loses confidence. The
graft keeps the inner drafter's tree as it is and merges the continuations that follow earlier occurrences
of the last n >= 2 tokens into it (shared prefixes reuse its nodes), adding at most `max_extra` nodes. When
nothing matches, the tree is the inner drafter's alone. Every node is a deterministic choice (a point
mass), so verification stays lossless.
"""

from __future__ import annotations

from dataclasses import replace

from featspec.drafters.ngram import NgramDrafter
from featspec.models.target import VerifyOutput
from featspec.protocol import DraftContext, Drafter, StepFeedback
from featspec.tree import DraftTree


class LookupGraft(Drafter):
    def __init__(self, inner: Drafter, max_extra: int = 16, depth: int = 10, max_matches: int = 3, max_ngram: int = 4,
                 min_ngram: int = 2):
        if max_extra < 1:
            raise ValueError(f"max_extra must be >= 1, got {max_extra}")
        self.inner = inner
        self.name = f"{inner.name}+lookup"
        self.wants_hidden = inner.wants_hidden
        # unigram matches are rarely right (docs/engine.md): by default only n >= 2 earns a graft
        self.lookup = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram, depth=depth, max_matches=max_matches)
        self.max_extra = max_extra
        self.grafted: list[int] = []  # nodes added per step (for reports and tests)
        self._own: DraftTree | None = None  # the inner drafter's last tree, before the graft

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        self.grafted = []
        self.inner.start(prompt_ids, prefill)

    def propose(self, ctx: DraftContext) -> DraftTree:
        tree = self._own = self.inner.propose(ctx)
        # too short a context or no room left yields no continuations, and grafting nothing returns `tree`
        paths = self.lookup.continuations(ctx.tokens, min(self.lookup.depth, ctx.max_depth))
        out = tree.grafted(paths, len(tree) + self.max_extra)
        self.grafted.append(len(out) - len(tree))
        return out

    def begin(self, prompt_ids: list[int]) -> None:
        self.inner.begin(prompt_ids)

    def cancel(self) -> None:
        self.inner.cancel()

    def observe(self, step: StepFeedback) -> None:
        """The inner drafter learns how much of its own tree was accepted: grafted nodes are not its proposals."""
        own = None
        if step.proposed and self._own is not None:
            own = self._own.matched([step.tree.tokens[i] for i in step.path[1:]])
        self._own = None
        self.inner.observe(replace(step, own_accepted=own))
