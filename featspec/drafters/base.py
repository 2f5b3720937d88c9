"""`vanilla`: the drafter that proposes nothing, so each step is one autoregressive target forward.

The protocol every drafter implements is `featspec.protocol` (core, beside the engine that drives it).
"""

from __future__ import annotations

from featspec.protocol import DraftContext, Drafter
from featspec.tree import DraftTree


class NoDraft(Drafter):
    """Propose only the root."""

    name = "vanilla"

    def propose(self, ctx: DraftContext) -> DraftTree:
        return DraftTree.root(ctx.tokens[-1])
