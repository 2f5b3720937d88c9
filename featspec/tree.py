"""DraftTree: the tokens a drafter proposes, as a tree rooted at the last committed token.

Node 0 is the root: the newest committed token, whose KV is not in the target cache yet. Every other
node i has a parent `parents[i] < i` (topological order), so one target forward over all nodes with an
ancestor-only attention mask scores every root path at once. Children are tried in the order they
appear, which matters for lossless sampling.

`q[i]` is the distribution node i's token was sampled from, or None when the token was chosen
deterministically (top-k, n-gram match, argmax). Siblings that carry a q must be independent draws from
their q; a drafter that samples without replacement must store point masses (None) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]
    q: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.q:
            self.q = [None] * len(self.tokens)
        if not (len(self.tokens) == len(self.parents) == len(self.q)) or self.parents[0] != -1:
            raise ValueError("DraftTree needs equal-length tokens/parents/q and parents[0] == -1")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")
        self._depths: list[int] | None = None
        self._children: list[list[int]] | None = None

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls([token], [-1])

    @classmethod
    def chain(cls, root: int, tokens: list[int], q: list[torch.Tensor | None] | None = None) -> "DraftTree":
        n = len(tokens)
        return cls([root] + list(tokens), list(range(-1, n)), [None] + (list(q) if q is not None else [None] * n))

    @classmethod
    def from_paths(cls, root: int, paths: list[list[int]], max_nodes: int) -> "DraftTree":
        """Merge token sequences into a trie (earlier paths first among siblings), at most max_nodes nodes."""
        return cls.root(root).grafted(paths, max_nodes)

    def grafted(self, paths: list[list[int]], max_nodes: int) -> "DraftTree":
        """This tree with token sequences from the root merged in: a path follows existing nodes while their
        tokens match and adds new nodes (after the existing ones, q None) until `max_nodes` nodes exist."""
        tokens, parents, q = list(self.tokens), list(self.parents), list(self.q)
        index = {(p, t): i for i, (t, p) in enumerate(zip(tokens, parents)) if i > 0}
        for path in paths:
            node = 0
            for tok in path:
                key = (node, tok)
                if key not in index:
                    if len(tokens) >= max_nodes:
                        break
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    q.append(None)
                node = index[key]
        return self if len(tokens) == len(self.tokens) else DraftTree(tokens, parents, q)

    def matched(self, tokens: list[int]) -> int:
        """How many of `tokens` this tree holds as a path from its root (e.g. of another tree's accepted path)."""
        node, n = 0, 0
        for tok in tokens:
            nxt = next((c for c in self.children[node] if self.tokens[c] == tok), None)
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        if self._depths is None:
            d = [0] * len(self.tokens)
            for i in range(1, len(d)):
                d[i] = d[self.parents[i]] + 1
            self._depths = d
        return self._depths

    @property
    def children(self) -> list[list[int]]:
        if self._children is None:
            ch: list[list[int]] = [[] for _ in self.tokens]
            for i in range(1, len(self.tokens)):
                ch[self.parents[i]].append(i)
            self._children = ch
        return self._children

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def max_depth(self) -> int:
        return max(self.depths)

    def truncated(self, max_depth: int, max_nodes: int | None = None) -> "DraftTree":
        """Drop nodes deeper than max_depth (and beyond max_nodes), keeping topological order."""
        depths = self.depths
        limit = len(self.tokens) if max_nodes is None else max_nodes
        if self.max_depth() <= max_depth and len(self.tokens) <= limit:
            return self
        keep: list[int] = []
        new_index: dict[int, int] = {}
        for i, d in enumerate(depths):
            if d <= max_depth and len(keep) < limit and (i == 0 or self.parents[i] in new_index):
                new_index[i] = len(keep)
                keep.append(i)
        return DraftTree(
            [self.tokens[i] for i in keep],
            [-1] + [new_index[self.parents[i]] for i in keep[1:]],
            [self.q[i] for i in keep],
        )

    def ancestor_matrix(self, device: torch.device | None = None) -> torch.Tensor:
        """Bool (n, n): entry [i, j] is True when node j is node i or one of its ancestors."""
        n = len(self.tokens)
        rows = [[False] * n for _ in range(n)]
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                rows[i][: p + 1] = rows[p][: p + 1]
            rows[i][i] = True
        return torch.tensor(rows, dtype=torch.bool, device=device)

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]
