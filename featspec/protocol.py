"""The contract between the engine and what it drives: drafters, and the guard that may skip drafting.

It sits in the core beside the engine, not in `drafters/`, because the engine consumes it and every drafter
(in `drafters/` or in an app such as `featspec.xmodal`) implements it: both sides import this module, so the
dependency points one way.

Per generation the engine calls `begin` just before the target's prefill (a drafter may start work that
overlaps it, such as the cross-modal drafter's own prefill), `cancel` if that prefill fails, `start` after it,
then per step `propose` (a DraftTree rooted at the newest committed token) and `observe` (what the target
accepted, as a `StepFeedback`). A drafter never touches the target's cache; it keeps its own state.
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
    # the engine's clock: seconds from the end of this drafter's previous proposal to this call (the verify
    # forward and the bookkeeping after it); None after the prefill or after a step the drafter did not propose
    since_proposal_s: float | None = None


@dataclass
class StepFeedback:
    """One verification as a drafter sees it."""

    tree: DraftTree  # the tree the target verified (a wrapper's tree may hold more than the drafter proposed)
    path: list[int]  # accepted node indices into `tree`, root first
    bonus: int  # the token the target added after the accepted path
    out: VerifyOutput  # the target's logits (and hidden states when the drafter asked for them) over `tree`
    proposed: bool = True  # False: the step ran without asking this drafter (the guard, or a sibling drafter)
    own_accepted: int | None = None  # accepted draft tokens the drafter's own proposal held (a graft sets it)

    @property
    def accepted_own(self) -> int:
        return len(self.path) - 1 if self.own_accepted is None else self.own_accepted


class Drafter:
    """Base of every drafter: the hooks a drafter needs not define do nothing."""

    name: str = "drafter"
    wants_hidden: bool = False  # ask the target for hidden states in prefill/verify (feature drafters)

    def begin(self, prompt_ids: list[int]) -> None:
        """Called just before the target's prefill: start work that overlaps it (`start` then waits for it)."""

    def cancel(self) -> None:
        """The target's prefill failed: stop (join) what `begin` started."""

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        """A new prompt: reset per-prompt state from the target's prefill."""

    def propose(self, ctx: DraftContext) -> DraftTree:
        raise NotImplementedError

    def observe(self, step: StepFeedback) -> None:
        """What the target accepted of the last tree (also called for steps this drafter did not propose)."""


class StepGuard(Protocol):
    """Decides per step whether to draft at all (`drafters.guard.Guard`, which prices steps with the cost model)."""

    reason: str  # why the current plain step runs without drafts

    def drafting(self) -> bool: ...

    def record(self, drafted: bool, committed: int, seconds: float) -> None: ...
