"""`block`: a tree from one block-head forward (heads/block.py), whatever its depth.

The head gives k next-token distributions at once, one per position after the root. The tree holds the best
paths through them by summed log-probability: a node at depth d is a choice among the top `topk` tokens of
position d, and its score is the sum of its path's log-probabilities (positions are drafted independently,
so a path's score is the sum of its nodes'). Nodes are taken best-first until the node budget is reached; a
child never scores above its parent, so the kept set is a tree. With a `Budget`, how many nodes to keep is
chosen per step from their scores and the machine's verify-cost curve (one forward, so no per-level choice).

Draft tokens are top-k choices (point masses), so verification keeps the target's exact distribution in both
greedy and sampling modes.
"""

from __future__ import annotations

import heapq
import time

import torch

from featspec.drafters.eagle import HeadState
from featspec.heads.block import BlockHead
from featspec.protocol import DraftContext, StepFeedback
from featspec.tree import DraftTree


class BlockDrafter(HeadState):
    def __init__(self, head: BlockHead, name: str = "block", topk: int = 4, total_tokens: int = 16, budget=None,
                 depth: int | None = None):
        if topk < 1 or total_tokens < 1:
            raise ValueError("topk and total_tokens must be >= 1")
        super().__init__(head, budget)
        self.name = name
        self.topk, self.total_tokens = topk, total_tokens
        self.depth = head.block_size if depth is None else min(depth, head.block_size)

    @torch.inference_mode()
    def observe(self, step: StepFeedback) -> None:
        if step.proposed and self.budget is not None:  # one forward: no per-level times or child probabilities
            self.budget.update(step.accepted_own, self._base_s, [], [], self._gap_s)
        self._take(step)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        t0 = time.perf_counter()
        depth = self._begin_proposal(ctx)
        m = self.pending.shape[0]
        tokens = torch.tensor(ctx.tokens[-m:], device=self.pending.device)
        # the block is drafted at full size whatever the room: a forward's cost hardly depends on k
        out, first_logits = self.head.draft(self.pending, tokens, self.cache.length, self.cache, self.head.block_size)
        self.pending = None
        tree = DraftTree.root(ctx.tokens[-1])
        if depth >= 1:
            if first_logits is None:
                logits = self.head.logits(out[:depth])
            elif depth == 1:
                logits = first_logits
            else:  # a chained head computed position 0's logits on the way: one LM-head read saved
                logits = torch.cat([first_logits, self.head.logits(out[1:depth])])
            logp = logits.float().log_softmax(-1)
            top = torch.topk(logp, min(self.topk, logp.shape[-1]), dim=-1)
            tree = self._tree(ctx.tokens[-1], self.head.to_target_ids(top.indices).tolist(), top.values.tolist())
        self._base_s = time.perf_counter() - t0
        return tree

    def _tree(self, root: int, ids: list[list[int]], lps: list[list[float]]) -> DraftTree:
        """Best-first over paths: pop the best frontier node, keep it, push its children at the next position.
        A chained head's later positions assume position 0's top token, so only that node gets children."""
        limit = self.total_tokens
        kept: list[tuple[float, int, int, int]] = []  # (score, depth, token, parent index into kept; -1 = root)
        heap = [(-lps[0][r], 1, ids[0][r], -1, r) for r in range(len(ids[0]))]
        heapq.heapify(heap)
        while heap and len(kept) < limit:
            neg, d, tok, parent, rank = heapq.heappop(heap)
            kept.append((-neg, d, tok, parent))
            if d < len(ids) and not (self.head.chain and d == 1 and rank > 0):
                me = len(kept) - 1
                for r in range(len(ids[d])):
                    heapq.heappush(heap, (neg - lps[d][r], d + 1, ids[d][r], me, r))
        if self.budget is not None and kept:
            n = self.budget.choose([(s, d) for s, d, _, _ in kept], limit, 0)
            kept = kept[:n]  # best-first order: every kept node's parent comes before it
        return DraftTree([root] + [tok for _, _, tok, _ in kept], [-1] + [p + 1 for _, _, _, p in kept])
