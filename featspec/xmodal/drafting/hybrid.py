"""Hybrid drafting: cross-modal drafts made during the target's prefill, then the target's own EAGLE-3 head.

The event drafter's strength is time: its prefill is short, so with parallel prefill its drafts are ready
when the target's first verification starts. Afterwards a head on the target's own features drafts
better and far cheaper than a second VLM. Both drafters see every start/observe, so either can take
over at any step with its state in sync.
"""

from __future__ import annotations

from dataclasses import replace

from featspec.drafters.eagle import FeatureDrafter
from featspec.models.target import VerifyOutput
from featspec.protocol import DraftContext, Drafter, StepFeedback
from featspec.tree import DraftTree
from featspec.xmodal.drafting.drafter import CrossModalDrafter


class HybridDrafter(Drafter):
    name = "hybrid"
    wants_hidden = True  # the EAGLE-3 head reads the target's features from the prefill on

    def __init__(self, first: CrossModalDrafter, then: FeatureDrafter, switch_after: int = 1):
        if switch_after < 0:
            raise ValueError(f"switch_after must be >= 0, got {switch_after}")
        self.first, self.then, self.switch_after = first, then, switch_after
        self.step = 0
        self.used: list[str] = []  # which drafter proposed at each step (for reports and tests)
        self._last: Drafter | None = None  # the drafter that proposed the step being verified

    def begin(self, prompt_ids: list[int]) -> None:
        self.first.begin(prompt_ids)

    def cancel(self) -> None:
        self.first.cancel()

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        self.first.start(prompt_ids, prefill)
        self.then.start(prompt_ids, prefill)
        self.step, self.used, self._last = 0, [], None

    def propose(self, ctx: DraftContext) -> DraftTree:
        self.step += 1
        drafter = self.first if self.step <= self.switch_after else self.then
        if drafter is not self._last:  # the time since the last proposal was spent on the other drafter's tree
            ctx = replace(ctx, since_proposal_s=None)
        self._last = drafter
        self.used.append(drafter.name)
        return drafter.propose(ctx)

    def observe(self, step: StepFeedback) -> None:
        """Both see every step (so either can take over in sync); only the proposer learns from its outcome."""
        for d in (self.first, self.then):
            d.observe(replace(step, proposed=step.proposed and d is self._last))
        if not step.proposed:
            self._last = None
