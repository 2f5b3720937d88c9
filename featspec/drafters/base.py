"""The Drafter protocol: every drafter (n-gram, small model, EAGLE heads, cross-modal) plugs in here.

The engine calls `start` once after the target's prefill, then per step `propose` (a DraftTree rooted
at the newest committed token) and `observe` (what the target accepted). A drafter may also define
`begin(prompt_ids)`, called just before the target's prefill, to start work that overlaps it (the
cross-modal drafter's parallel prefill); `start` must then wait for that work. A drafter never touches the
target's cache; it may keep its own state (its own KV cache, n-gram index, features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from featspec.models.target import VerifyOutput
from featspec.sampling import SamplingConfig
from featspec.tree import DraftTree


@dataclass
class DraftContext:
    """What a drafter may look at when proposing."""

    tokens: list[int]  # prompt + committed tokens; tokens[-1] is the tree root
    max_depth: int  # deeper nodes would be cut (max_new_tokens / context length)
    sampling: SamplingConfig
    generator: torch.Generator | None


class Drafter(Protocol):
    name: str
    wants_hidden: bool  # ask the target for hidden states in prefill/verify (feature drafters)

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None: ...

    def propose(self, ctx: DraftContext) -> DraftTree: ...

    def observe(self, tree: DraftTree, path: list[int], bonus: int, out: VerifyOutput) -> None: ...


class NoDraft:
    """`vanilla`: propose only the root, so each step is one autoregressive target forward."""

    name = "vanilla"
    wants_hidden = False

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        return DraftTree.root(ctx.tokens[-1])

    def observe(self, tree: DraftTree, path: list[int], bonus: int, out: VerifyOutput) -> None:
        pass
