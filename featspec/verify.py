"""Acceptance rules: which root path of a draft tree the target keeps, plus one bonus token.

Greedy: follow the child whose token equals the target's argmax at each node.
Sampling (lossless): at each node try the children in order. A child x drawn from q is accepted with
probability min(1, p(x)/q(x)); a deterministic child (q is None, a point mass) with probability p(x).
On rejection p becomes normalise((p - q)+) (for a point mass: p(x) = 0, renormalised) and the next
child is tried. When every child is rejected, the bonus token is drawn from what remains of p.
Every random number comes from the caller's torch.Generator, so runs are reproducible.
"""

from __future__ import annotations

import torch

from featspec.tree import DraftTree


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Return (accepted node indices from the root, bonus token) for target logits (n, V)."""
    best = logits.argmax(-1).tolist()
    children, tokens = tree.children, tree.tokens
    node, path = 0, [0]
    while True:
        nxt = next((c for c in children[node] if tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        node = nxt
        path.append(node)


def _rand(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=device).item())


def verify_sampling(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Lossless tree acceptance for processed target probabilities `probs` (n, V), float32."""
    children, tokens = tree.children, tree.tokens
    node, path = 0, [0]
    while True:
        p = probs[node]
        accepted = None
        for child in children[node]:
            x, q = tokens[child], tree.q[child]
            if q is None:
                accept_prob = float(p[x])
            else:
                qx = float(q[x])
                accept_prob = 1.0 if qx <= 0 else min(1.0, float(p[x]) / qx)
            if _rand(generator, p.device) < accept_prob:
                accepted = child
                break
            if q is None:
                residual = p.clone()
                residual[x] = 0.0
            else:
                q = q.to(p)
                if q.numel() < p.numel():  # a draft model with a smaller (unpadded) vocabulary
                    q = torch.nn.functional.pad(q, (0, p.numel() - q.numel()))
                residual = (p - q).clamp_min(0.0)
            mass = residual.sum()
            if mass > 0:  # mass 0 needs accept_prob 1, i.e. the child was accepted; guard float noise
                p = residual / mass
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator).item())
        node = accepted
        path.append(node)
