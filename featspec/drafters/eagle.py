"""Feature-level drafting with an EAGLE-1 or EAGLE-3 head: static trees (EAGLE-1) and dynamic trees (EAGLE-2).

The head keeps its own KV cache over committed positions: entry t pairs the target's feature of
position t with token t+1. After each verification the features of the accepted nodes arrive through
`observe` and are fed with the next committed tokens at the next `propose`. A tree is then grown
level by level: the chosen frontier nodes are fed in one head forward (a tree mask over cached +
new entries), each returns its own feature, which drafts its children and feeds their turn.

Tree policies:
- static (EAGLE-1): a fixed set of rank paths, e.g. (0, 1) = second-best child of the best child.
- dynamic (EAGLE-2): expand the `topk` frontier nodes with the highest cumulative draft
  log-probability at each depth, then keep the `total_tokens` best nodes overall (a node never
  scores above its ancestors, so the kept set is a tree). With a `Budget`, the number of kept nodes
  is chosen per step from the draft's confidence and the target's measured verify-cost curve.

Draft tokens are top-k choices (point masses), so the engine's verification keeps the target's exact
distribution in both greedy and sampling modes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from featspec.protocol import DraftContext, Drafter, StepFeedback
from featspec.heads.base import DraftHead
from featspec.models.target import VerifyOutput
from featspec.tree import DraftTree

# A 25-node static tree (rank paths), shaped like EAGLE-1's: wide near the root, one long greedy spine.
DEFAULT_STATIC_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0, 0),
    (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 0, 1, 0),
)


@dataclass
class _Node:
    token: int  # target id
    parent: int  # index into the node list, -1 = the tree root
    depth: int  # 1 for the root's children
    score: float  # cumulative draft log-probability
    rank: tuple[int, ...]  # child ranks from the root (static trees)
    out: torch.Tensor | None = None  # the head's feature after feeding this node
    col: int = -1  # cache column once fed


class HeadState(Drafter):
    """What every drafter on a feature head keeps: the head's own KV cache over committed positions, and the
    head-space features of committed positions not fed to it yet (from the prefill, then from each accepted
    path), plus the timings the tree budget calibrates on."""

    wants_hidden = True

    def __init__(self, head: DraftHead, budget=None):
        self.head = head.eval()
        self.budget = budget
        self.cache = None
        self.pending: torch.Tensor | None = None  # head-space features of committed positions not fed yet
        # the engine's seconds from the previous proposal to this one (its verify and bookkeeping), and the
        # drafting time before the first level: what the budget's cost curve is calibrated with
        self._gap_s: float | None = None
        self._base_s = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def _fuse(self, hidden: tuple[torch.Tensor, ...], rows: list[int] | slice) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype
        return self.head.fuse([hidden[i][rows].to(dtype) for i in self.head.layer_ids])

    @torch.inference_mode()
    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        if prefill.hidden is None:
            raise RuntimeError("feature drafters need the target's hidden states (wants_hidden)")
        self.cache = self.head.new_cache()
        self.pending = self._fuse(prefill.hidden, slice(None))

    def _take(self, step: StepFeedback) -> None:
        """Queue the accepted path's features for the next proposal."""
        feats = self._fuse(step.out.hidden, step.path)
        self.pending = feats if self.pending is None else torch.cat([self.pending, feats])

    def _begin_proposal(self, ctx: DraftContext) -> int:
        """Start a proposal: note the engine's timing, price trees at this context; returns the depth to draft."""
        self._gap_s = ctx.since_proposal_s
        if self.budget is not None:
            self.budget.at(len(ctx.tokens))
        return min(self.depth, ctx.max_depth)


class FeatureDrafter(HeadState):
    """One drafter for every feature head; the tree policy is static or dynamic."""

    def __init__(self, head: DraftHead, name: str, static_tree: tuple[tuple[int, ...], ...] | None = None,
                 depth: int = 4, topk: int = 4, total_tokens: int = 8, budget=None):
        if static_tree is None and (depth < 1 or topk < 1 or total_tokens < 1):
            raise ValueError("depth, topk and total_tokens must be >= 1")
        super().__init__(head, budget)
        self.name = name
        self.static = set(static_tree) if static_tree is not None else None
        if self.static is not None and (not self.static or any(p[:-1] and p[:-1] not in self.static for p in self.static)):
            raise ValueError("a static tree must be a non-empty, prefix-closed set of rank paths")
        # rank paths that have children in the static tree: computed once, not per drafted level
        self._expandable = {p[:-1] for p in self.static} if self.static is not None else set()
        self.depth = max(len(p) for p in static_tree) if static_tree is not None else depth
        self.topk = (max(max(p) for p in static_tree) + 1) if static_tree is not None else topk
        self.total_tokens = total_tokens
        self._level_s: list[float] = []  # drafting time per level of the current step
        self._top1: list[list[float]] = []  # per drafted level, frontier order (best score first)

    @torch.inference_mode()
    def observe(self, step: StepFeedback) -> None:
        if step.proposed and self.budget is not None:  # a step run without our tree has nothing to calibrate
            self.budget.update(step.accepted_own, self._base_s, self._level_s, self._top1, self._gap_s)
        self._take(step)

    def _run(self, feats: torch.Tensor, tokens: list[int], positions: list[int], mask: torch.Tensor | None):
        dev = self.device
        out = self.head(feats[None], torch.tensor([tokens], device=dev), torch.tensor([positions], device=dev),
                        self.cache, None if mask is None else mask[None, None])
        return out[0]

    def _children(self, out: torch.Tensor, k: int) -> tuple[list, list]:
        """Top-k draft tokens (as target ids) and their log-probabilities for each head output."""
        logp = self.head.logits(out).float().log_softmax(-1)
        top = torch.topk(logp, k, dim=-1)
        ids = self.head.to_target_ids(top.indices)
        return ids.tolist(), top.values.tolist()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        self._level_s, self._top1 = [], []
        t0 = time.perf_counter()
        root = ctx.tokens[-1]
        depth = self._begin_proposal(ctx)
        # 1. feed the committed (feature, next token) pairs; keep them in the cache for good
        m = self.pending.shape[0]
        real = self.cache.length
        last = self._run(self.pending, ctx.tokens[-m:], list(range(real, real + m)), None)[-1]
        self.pending = None
        real += m
        if depth < 1:
            return DraftTree.root(root)
        # 2. grow the tree level by level; tree entries are cut from the cache afterwards
        nodes: list[_Node] = []
        ids, lps = self._children(last, self.topk)
        level = [self._new(nodes, -1, t, lp, (r,)) for r, (t, lp) in enumerate(zip(ids, lps))]
        fed_anc: list[list[int]] = []  # per fed entry: cache columns of itself and its fed ancestors
        self._base_s = time.perf_counter() - t0
        levels = 0  # levels drafted after the root's children
        for d in range(1, depth):
            frontier = self._frontier(nodes, level)
            if not frontier or (self.budget is not None and self.static is None and not self.budget.extend(
                    self._ranked(nodes), [nodes[n].score for n in frontier], d + 1, levels, self.total_tokens)):
                break
            t_level = time.perf_counter()
            cols = [real + len(fed_anc) + i for i in range(len(frontier))]
            mask = torch.zeros(len(frontier), real + len(fed_anc) + len(frontier), dtype=torch.bool, device=self.device)
            mask[:, :real] = True
            for i, n in enumerate(frontier):
                node = nodes[n]
                anc = (fed_anc[nodes[node.parent].col - real] if node.parent >= 0 else []) + [cols[i]]
                fed_anc.append(anc)
                mask[i, anc] = True
                node.col = cols[i]
            feats = torch.stack([nodes[nodes[n].parent].out if nodes[n].parent >= 0 else last for n in frontier])
            outs = self._run(feats, [nodes[n].token for n in frontier], [real + d - 1] * len(frontier), mask)
            k = self.topk
            child_ids, child_lp = self._children(outs, k)
            if self.budget is not None:
                self._top1.append([math.exp(lp[0]) for lp in child_lp])
            level = []
            for i, n in enumerate(frontier):
                nodes[n].out = outs[i]
                for r in range(k):
                    if self.static is None or nodes[n].rank + (r,) in self.static:
                        level.append(self._new(nodes, n, child_ids[i][r], nodes[n].score + child_lp[i][r], nodes[n].rank + (r,)))
            levels += 1
            self._level_s.append(time.perf_counter() - t_level)
        self.cache.truncate(real)
        return self._build(root, nodes, depth, levels)

    @staticmethod
    def _new(nodes: list[_Node], parent: int, token: int, score: float, rank: tuple[int, ...]) -> int:
        depth = nodes[parent].depth + 1 if parent >= 0 else 1
        nodes.append(_Node(token, parent, depth, score, rank))
        return len(nodes) - 1

    def _frontier(self, nodes: list[_Node], level: list[int]) -> list[int]:
        if self.static is not None:
            return [n for n in level if nodes[n].rank in self.static and nodes[n].rank in self._expandable]
        return sorted(level, key=lambda n: -nodes[n].score)[: self.topk]

    def _candidates(self, nodes: list[_Node], depth: int) -> list[int]:
        """Node indices in the order the budget ranks them: best score first, shallower on ties."""
        cand = [i for i, n in enumerate(nodes) if n.depth <= depth and (self.static is None or n.rank in self.static)]
        return sorted(cand, key=lambda i: (-nodes[i].score, nodes[i].depth))

    def _ranked(self, nodes: list[_Node]) -> list[tuple[float, int]]:
        return [(nodes[i].score, nodes[i].depth) for i in self._candidates(nodes, self.depth)]

    def _build(self, root: int, nodes: list[_Node], depth: int, levels: int) -> DraftTree:
        cand = self._candidates(nodes, depth)
        if self.static is None:
            limit = self.total_tokens
            if self.budget is not None:
                limit = self.budget.choose([(nodes[i].score, nodes[i].depth) for i in cand], limit, levels)
            cand = cand[:limit]
        kept = set(cand)
        order = sorted(cand, key=lambda i: (nodes[i].depth, -nodes[i].score))
        index = {i: j + 1 for j, i in enumerate(order)}
        tokens, parents = [root], [-1]
        for i in order:
            p = nodes[i].parent
            assert p < 0 or p in kept, "a kept node lost its parent"
            tokens.append(nodes[i].token)
            parents.append(index[p] if p >= 0 else 0)
        return DraftTree(tokens, parents)
