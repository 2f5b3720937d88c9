"""`ngram`: prompt-lookup drafting that proposes a tree built from several matches.

The last n tokens (n from max_ngram down to min_ngram) are searched for in the prompt and the text
generated so far; the continuations after the most recent matches are merged into a trie. Longer
n-gram matches and more recent ones come first among siblings. A match of the last token alone is
used only when no longer match exists, and then as one short chain (it is rarely right). When nothing
matches the tree is the root alone, which costs the same as a plain decoding step.
"""

from __future__ import annotations

import torch

from featspec.protocol import DraftContext, Drafter
from featspec.tree import DraftTree


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, depth: int = 10, max_matches: int = 6, max_nodes: int = 32,
                 unigram_depth: int = 3, unigram_matches: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.depth, self.max_matches, self.max_nodes = depth, max_matches, max_nodes
        # a match on the last token alone is right far less often (measured on MT-bench, bf16: most
        # such drafts are rejected at depth 1), so it earns a short chain, not a wide deep tree
        self.unigram_depth, self.unigram_matches = unigram_depth, unigram_matches

    def continuations(self, tokens: list[int], depth: int) -> list[list[int]]:
        """Distinct continuations after earlier occurrences of the context's last n-grams, best first."""
        seq = torch.tensor(tokens)
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            windows = seq[:-1].unfold(0, n, 1)  # windows that end before the last token
            hits = (windows == seq[-n:]).all(-1).nonzero().flatten().tolist()
            if n == 1:
                if found:
                    return found  # longer matches exist: weak unigram matches would only widen the tree
                hits = hits[-self.unigram_matches:] if self.unigram_matches else []
            span = depth if n > 1 else min(depth, self.unigram_depth)
            for start in reversed(hits):  # most recent first
                cont = tokens[start + n : start + n + span]
                key = tuple(cont)
                if cont and key not in seen:
                    seen.add(key)
                    found.append(cont)
                    if len(found) >= self.max_matches:
                        return found
        return found

    def propose(self, ctx: DraftContext) -> DraftTree:
        depth = min(self.depth, ctx.max_depth)
        if depth < 1 or len(ctx.tokens) < 2:
            return DraftTree.root(ctx.tokens[-1])
        return DraftTree.from_paths(ctx.tokens[-1], self.continuations(ctx.tokens, depth), self.max_nodes)
