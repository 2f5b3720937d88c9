"""`--budget auto`: choose, at every step, how deep to draft and how many draft nodes to verify.

The target's verify cost as a function of the number of tree nodes and the context length comes from
the machine's cost model (`cost.py`: measured once, cached, made non-decreasing). A node with cumulative draft log-probability s at depth d is
accepted with probability ~ c_d * exp(s) (EAGLE-2's observation: draft confidence tracks
acceptance), where c_d is a running calibration per depth (accepted / predicted), since a head's
confidence drifts from its acceptance more the deeper it drafts. Keeping the n best nodes after L
drafted levels promises E(n) = 1 + sum c_d exp(s) tokens in
    T(n, L) = base + L * level + cost(n + 1) + other
seconds, with running means of the drafting time before the first level (`base`), per level
(`level`) and the rest of a step beyond the curve (`other`: bookkeeping, and the curve's error at
the current context length). Before each level the budget asks whether the level's expected
children (the frontier's scores times the head's running top-1 child probability at each frontier
rank) would raise the best E / T; after the last level it keeps the n that maximises E(n) / T(n, L).
c_d and the child probabilities are `Evidence`: shrunk towards a prior and faded back to it while
unmeasured, so an early bad step cannot switch a depth off for the rest of a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from featspec.drafters.cost import CostCurve, CostModel


def _ema(old: float | None, new: float, keep: float = 0.9) -> float:
    return new if old is None else keep * old + (1 - keep) * new


@dataclass
class Evidence:
    """A running ratio sum(num) / sum(den) over recent observations (each older one weighs `keep` times
    less), shrunk towards `start` by `prior` pseudo-observations. Estimates that steer what gets drafted
    are only measured while it is drafted; `fade` lets an estimate that stopped the drafting drift back to
    its prior, so one unlucky early step cannot switch a depth (or a level) off for good."""

    start: float
    prior: float = 2.0
    num: float = 0.0
    den: float = 0.0

    def value(self) -> float:
        return (self.num + self.prior * self.start) / (self.den + self.prior)

    def add(self, num: float, den: float, keep: float) -> None:
        self.num = keep * self.num + num
        self.den = keep * self.den + den

    def fade(self, keep: float) -> None:
        self.num *= keep
        self.den *= keep


FORGET = 0.97  # per step an estimate goes unmeasured, its evidence shrinks by this (about 25 steps to halve)


@dataclass
class Budget:
    """Per-step draft depth and node budget from draft confidence, measured costs and feedback.

    Nodes are (score, depth) pairs, score = cumulative draft log-probability."""

    costs: CostModel | CostCurve  # a bare curve prices every context alike
    min_nodes: int = 1
    curve: CostCurve | None = None  # the verify curve at the current context (`at`)
    base_s: float | None = None
    level_s: float | None = None
    other_s: float | None = None
    # per depth: accepted / predicted acceptance mass of the kept nodes, over about the last 20 steps
    _calib: dict[int, Evidence] = field(default_factory=dict)
    # per frontier rank (0 = the best-scored node of a level): its top-1 child probability, over about
    # the last 50 levels; one mean over all ranks lets the weak siblings talk the budget out of
    # extending the strong chain
    _child: dict[int, Evidence] = field(default_factory=dict)
    _kept: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.curve is None:
            self.at(0)

    def at(self, context: int) -> None:
        """Price trees at this context length (the verify cost grows with the cache)."""
        self.curve = self.costs if isinstance(self.costs, CostCurve) else self.costs.curve(context)

    def calibration(self, depth: int) -> float:
        """Accepted / predicted acceptance at this depth (1 until measured)."""
        return self._calib[depth].value() if depth in self._calib else 1.0

    def child_p(self, rank: int) -> float:
        """Expected top-1 child probability of the frontier node of this rank (0.5 until measured)."""
        return self._child[rank].value() if rank in self._child else 0.5

    def _fixed_s(self, levels: int) -> float:
        return (self.base_s or 0.0) + levels * (self.level_s or 0.0) + (self.other_s or 0.0)

    def _best(self, nodes: list[tuple[float, int]], limit: int, levels: int) -> tuple[int, float]:
        """(n, tokens per second) of the best prefix of the score-sorted `nodes`."""
        fixed = self._fixed_s(levels)
        best_n, best_rate, expected = 0, 1.0 / max(1e-9, self.curve(1) + fixed), 1.0
        for n, (s, d) in enumerate(nodes[:limit], start=1):
            expected += min(1.0, self.calibration(d) * math.exp(s))
            rate = expected / max(1e-9, self.curve(n + 1) + fixed)
            if rate > best_rate or n <= self.min_nodes:
                best_n, best_rate = n, rate
        return best_n, best_rate

    def extend(self, nodes: list[tuple[float, int]], frontier: list[float], depth: int, levels: int, limit: int) -> bool:
        """Is drafting one more level (children at `depth` of the `frontier` scores, best first) worth its time?"""
        _, now = self._best(nodes, limit, levels)
        guess = [(s + math.log(max(self.child_p(r), 1e-6)), depth) for r, s in enumerate(frontier)]
        _, after = self._best(sorted(nodes + guess, key=lambda x: (-x[0], x[1])), limit, levels + 1)
        return after > now

    def choose(self, nodes: list[tuple[float, int]], limit: int, levels: int = 0) -> int:
        """Number of the score-sorted `nodes` to keep (at most `limit`) after `levels` drafted levels."""
        n, _ = self._best(nodes, limit, levels)
        self._kept = list(nodes[:n])
        return n

    def update(self, accepted: int, base_s: float, level_s: list[float], top1: list[list[float]],
               gap_s: float | None) -> None:
        """Feed back one step: draft tokens accepted, drafting times (before the first level, per level),
        top-1 child probabilities seen (per drafted level, frontier nodes best-scored first), and the seconds
        from the end of drafting to the next draft (verify and bookkeeping), if known."""
        self.base_s = _ema(self.base_s, base_s)
        for t in level_s:
            self.level_s = _ema(self.level_s, t)
        seen = set()
        for level in top1:
            for r, p in enumerate(level):
                self._child.setdefault(r, Evidence(0.5)).add(p, 1.0, 0.98)
                seen.add(r)
        for r in self._child.keys() - seen:
            self._child[r].fade(FORGET)
        if gap_s is not None:
            verify = self.curve(len(self._kept) + 1)
            self.other_s = _ema(self.other_s, max(gap_s - verify, -0.5 * verify))
        mass: dict[int, float] = {}
        for s, d in self._kept:
            mass[d] = mass.get(d, 0.0) + math.exp(s)
        self._kept = []  # a step that drafts nothing (the root only) keeps nothing
        if not mass:
            return
        for d, m in mass.items():
            self._calib.setdefault(d, Evidence(1.0)).add(float(accepted >= d), min(1.0, m), 0.95)
        for d in self._calib.keys() - mass.keys():
            self._calib[d].fade(FORGET)
