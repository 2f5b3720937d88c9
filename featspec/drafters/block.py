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

from featspec.heads.block import BlockHead
from featspec.models.target import VerifyOutput
from featspec.protocol import DraftContext, Drafter, StepFeedback
from featspec.tree import DraftTree


class BlockDrafter(Drafter):
    wants_hidden = True

    def __init__(self, head: BlockHead, name: str = "block", topk: int = 4, total_tokens: int = 16, budget=None,
                 depth: int | None = None):
        if topk < 1 or total_tokens < 1:
            raise ValueError("topk and total_tokens must be >= 1")
        self.head = head.eval()
        self.name = name
        self.topk, self.total_tokens, self.budget = topk, total_tokens, budget
        self.depth = head.block_size if depth is None else min(depth, head.block_size)
        self.cache = None
        self.pending: torch.Tensor | None = None  # head-space features of committed positions not fed yet
        self._base_s = 0.0
        self._gap_s: float | None = None

    def _fuse(self, hidden: tuple[torch.Tensor, ...], rows) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype
        return self.head.fuse([hidden[i][rows].to(dtype) for i in self.head.layer_ids])

    @torch.inference_mode()
    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        if prefill.hidden is None:
            raise RuntimeError("the block drafter needs the target's hidden states (wants_hidden)")
        self.cache = self.head.new_cache()
        self.pending = self._fuse(prefill.hidden, slice(None))

    @torch.inference_mode()
    def observe(self, step: StepFeedback) -> None:
        if step.proposed and self.budget is not None:
            self.budget.update(step.accepted_own, self._base_s, [], [], self._gap_s)
        feats = self._fuse(step.out.hidden, step.path)
        self.pending = feats if self.pending is None else torch.cat([self.pending, feats])

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        t0 = time.perf_counter()
        self._gap_s = ctx.since_proposal_s
        depth = min(self.depth, ctx.max_depth)
        if self.budget is not None:
            self.budget.at(len(ctx.tokens))
        m = self.pending.shape[0]
        start = self.cache.length
        tokens = torch.tensor(ctx.tokens[-m:], device=self.pending.device)
        # the block is drafted at full size whatever the room: a forward's cost hardly depends on k
        out = self.head.draft(self.pending, tokens, start, self.cache, self.head.block_size)
        self.pending = None
        if depth < 1:
            self._base_s = time.perf_counter() - t0
            return DraftTree.root(ctx.tokens[-1])
        logp = self.head.logits(out[:depth]).float().log_softmax(-1)
        top = torch.topk(logp, min(self.topk, logp.shape[-1]), dim=-1)
        ids = self.head.to_target_ids(top.indices).tolist()
        lps = top.values.tolist()
        tree = self._tree(ctx.tokens[-1], ids, lps)
        self._base_s = time.perf_counter() - t0
        return tree

    def _tree(self, root: int, ids: list[list[int]], lps: list[list[float]]) -> DraftTree:
        """Best-first over paths: pop the best frontier node, keep it, push its children at the next position."""
        limit = self.total_tokens
        kept: list[tuple[float, int, int, int]] = []  # (score, depth, token, parent index into kept; -1 = root)
        heap = [(-lps[0][r], 1, ids[0][r], -1) for r in range(len(ids[0]))]
        heapq.heapify(heap)
        while heap and len(kept) < limit:
            neg, d, tok, parent = heapq.heappop(heap)
            kept.append((-neg, d, tok, parent))
            if d < len(ids):
                me = len(kept) - 1
                for r in range(len(ids[d])):
                    heapq.heappush(heap, (neg - lps[d][r], d + 1, ids[d][r], me))
        if self.budget is not None and kept:
            n = self.budget.choose([(s, d) for s, d, _, _ in kept], limit, 0)
            kept = kept[:n]  # best-first order: every kept node's parent comes before it
        return DraftTree([root] + [tok for _, _, tok, _ in kept], [-1] + [p + 1 for _, _, _, p in kept])
