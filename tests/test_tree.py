"""DraftTree unit tests: construction, trie merging, truncation, ancestry."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featspec.tree import DraftTree


def random_tree(rng: random.Random, n: int, vocab: int = 5) -> DraftTree:
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return DraftTree([rng.randrange(vocab) for _ in range(n)], parents)


def check_valid(tree: DraftTree) -> None:
    assert tree.parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(tree.parents[1:], start=1))
    assert len(tree.tokens) == len(tree.parents) == len(tree.q)


def root_paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Token sequences (root excluded) of every root-to-node path."""
    return {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))}


# ---------------------------------------------------------------- construction / validation


def test_root_and_chain():
    r = DraftTree.root(7)
    assert r.tokens == [7] and r.parents == [-1] and r.q == [None]
    assert r.is_chain() and r.max_depth() == 0 and r.children == [[]]

    q = [torch.full((4,), 0.25), None, torch.tensor([0.0, 1.0, 0.0, 0.0])]
    c = DraftTree.chain(3, [5, 6, 1], q)
    assert c.tokens == [3, 5, 6, 1]
    assert c.parents == [-1, 0, 1, 2]
    assert c.q[0] is None and c.q[1] is q[0] and c.q[2] is None and c.q[3] is q[2]
    assert c.is_chain() and c.depths == [0, 1, 2, 3]
    assert c.children == [[1], [2], [3], []]


@pytest.mark.parametrize(
    "tokens, parents, q",
    [
        ([1, 2], [0, 0], None),  # root must have parent -1
        ([1, 2], [-1, 1], None),  # self-parent
        ([1, 2, 3], [-1, 2, 0], None),  # parent after child
        ([1, 2], [-1, -1], None),  # second root
        ([1, 2], [-1, 5], None),  # out of range
        ([1, 2, 3], [-1, 0], None),  # length mismatch
        ([1, 2], [-1, 0], [None]),  # q length mismatch
    ],
)
def test_invalid_trees_rejected(tokens, parents, q):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents, q if q is not None else [])


def test_branching_tree_structure():
    #        0
    #      / | \
    #     1  2  5
    #    / \     \
    #   3   4     6
    t = DraftTree([10, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 0, 5])
    assert t.depths == [0, 1, 1, 2, 2, 1, 2]
    assert t.children == [[1, 2, 5], [3, 4], [], [], [], [6], []]
    assert not t.is_chain()
    assert t.max_depth() == 2
    assert t.path_to(4) == [0, 1, 4]
    assert t.path_to(6) == [0, 5, 6]
    assert t.path_to(0) == [0]
    a = t.ancestor_matrix()
    assert a.dtype == torch.bool and a.shape == (7, 7)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        expected[i, t.path_to(i)] = True
    assert torch.equal(a, expected)
    # node 2 must not see its sibling 1 or its cousins
    assert not a[2, 1] and not a[3, 4] and not a[6, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_ancestor_matrix_matches_paths(n, seed):
    t = random_tree(random.Random(seed), n)
    a = t.ancestor_matrix()
    for i in range(n):
        path = t.path_to(i)
        assert path[0] == 0 and path[-1] == i
        assert len(path) == t.depths[i] + 1
        assert a[i].nonzero().flatten().tolist() == sorted(path)
        assert sum(1 for j in range(n) if i in t.children[j]) == (0 if i == 0 else 1)
    # lower triangular: a node only sees earlier nodes
    assert not torch.triu(a, diagonal=1).any()


# ---------------------------------------------------------------- from_paths


def test_from_paths_merges_shared_prefixes_in_order():
    t = DraftTree.from_paths(9, [[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2, 3]], max_nodes=100)
    assert t.tokens == [9, 1, 2, 3, 4, 5, 6]
    assert t.parents == [-1, 0, 1, 2, 2, 1, 0]
    # earlier paths first among siblings
    assert t.children[0] == [1, 6] and t.children[2] == [3, 4]
    assert all(q is None for q in t.q)


def test_from_paths_respects_max_nodes():
    t = DraftTree.from_paths(0, [[1, 2, 3, 4], [1, 2, 7], [5, 6]], max_nodes=5)
    assert len(t) == 5
    assert t.tokens == [0, 1, 2, 3, 4]
    check_valid(t)
    # a later path still reuses existing nodes but adds nothing once the budget is spent
    t = DraftTree.from_paths(0, [[1, 2], [3, 4], [1, 2, 9]], max_nodes=4)
    assert t.tokens == [0, 1, 2, 3] and t.parents == [-1, 0, 1, 0]
    assert len(DraftTree.from_paths(0, [[1, 2]], max_nodes=1)) == 1
    assert DraftTree.from_paths(0, [], max_nodes=8).tokens == [0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), max_size=8),
    st.integers(1, 30),
)
def test_from_paths_is_a_trie(paths, max_nodes):
    t = DraftTree.from_paths(99, paths, max_nodes)
    check_valid(t)
    assert len(t) <= max_nodes
    # no two siblings carry the same token
    for ch in t.children:
        toks = [t.tokens[c] for c in ch]
        assert len(toks) == len(set(toks))
    got = root_paths(t)
    # every tree path is a prefix of some input path
    for p in got:
        assert any(tuple(path[: len(p)]) == p for path in paths) or p == ()
    if max_nodes >= 1 + sum(len(p) for p in paths):
        # unlimited budget: every prefix of every input path is in the tree, and nothing else
        assert got == {tuple(path[:k]) for path in paths for k in range(len(path) + 1)} | {()}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=4), max_size=5), st.integers(1, 12),
       st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), max_size=5), st.integers(0, 12))
def test_grafted_keeps_the_tree_and_adds_paths(first, n, paths, extra):
    """Grafting leaves every original node where it was (index, token, parent, q) and adds each path's
    missing nodes after them, reusing matching nodes, up to the node cap."""
    tree = DraftTree.from_paths(7, first, n)
    out = tree.grafted(paths, len(tree) + extra)
    check_valid(out)
    assert len(tree) <= len(out) <= len(tree) + extra
    assert out.tokens[: len(tree)] == tree.tokens and out.parents[: len(tree)] == tree.parents
    assert out.q[: len(tree)] == tree.q and all(q is None for q in out.q[len(tree):])
    assert root_paths(tree) <= root_paths(out)
    for p in root_paths(out) - root_paths(tree):  # new paths are prefixes of grafted ones
        assert any(tuple(path[: len(p)]) == p for path in paths)
    if extra >= sum(len(p) for p in paths):
        for path in paths:
            assert out.matched(path) == len(path)


def test_matched_counts_a_path_prefix():
    t = DraftTree.from_paths(0, [[1, 2, 3], [1, 4]], max_nodes=10)
    assert t.matched([1, 2, 3]) == 3 and t.matched([1, 4, 9]) == 2 and t.matched([2]) == 0 and t.matched([]) == 0


# ---------------------------------------------------------------- truncated


def test_truncated_by_depth_and_nodes():
    t = DraftTree([10, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 0, 5])
    assert t.truncated(5) is t
    d1 = t.truncated(1)
    assert d1.tokens == [10, 11, 12, 15] and d1.parents == [-1, 0, 0, 0]
    d0 = t.truncated(0)
    assert d0.tokens == [10] and d0.parents == [-1]
    n4 = t.truncated(5, max_nodes=4)
    assert n4.tokens == [10, 11, 12, 13] and n4.parents == [-1, 0, 0, 1]


def test_truncated_keeps_q_aligned():
    qs = [None] + [torch.full((3,), float(i)) for i in range(1, 5)]
    t = DraftTree([0, 1, 2, 3, 4], [-1, 0, 1, 0, 3], qs)
    s = t.truncated(1)
    assert s.tokens == [0, 1, 3]
    assert s.q[0] is None and s.q[1] is qs[1] and s.q[2] is qs[3]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.integers(0, 8), st.none() | st.integers(1, 30))
def test_truncated_is_valid_subtree(n, seed, max_depth, max_nodes):
    t = random_tree(random.Random(seed), n)
    t.q = [None] + [torch.tensor([float(i)]) for i in range(1, n)]  # tag nodes to track them
    s = t.truncated(max_depth, max_nodes)
    check_valid(s)
    assert s.tokens[0] == t.tokens[0]
    assert s.max_depth() <= max_depth
    if max_nodes is not None:
        assert len(s) <= max_nodes
    # every kept node is an original node with the same token and the same root path
    orig = [0] + [int(q.item()) for q in s.q[1:]]
    assert orig == sorted(orig)  # topological order preserved
    for new, old in enumerate(orig):
        assert s.tokens[new] == t.tokens[old]
        assert [orig[k] for k in s.path_to(new)] == t.path_to(old)
    # by depth alone nothing shallow enough is dropped
    if max_nodes is None:
        assert len(s) == sum(1 for d in t.depths if d <= max_depth)
