"""`--budget auto`: choose, at every step, how deep to draft and how many draft nodes to verify.

The target's verify cost as a function of the number of tree nodes is measured once per
(model, dtype, device, threads) and cached as JSON (made non-decreasing: timing noise must not make
12 nodes look cheaper than 8). A node with cumulative draft log-probability s at depth d is
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

import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featspec.bench.report import write_json
from featspec.models.registry import cache_root
from featspec.tree import DraftTree

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def monotone(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators): a bigger tree never costs less."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [b[0] / b[1] for b in blocks for _ in range(b[1])]


@dataclass
class CostCurve:
    """Seconds per verify forward at each measured tree size (made non-decreasing); linear in between."""

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        self.seconds = monotone(list(self.seconds))

    def __call__(self, n: int) -> float:
        xs, ys = self.sizes, self.seconds
        if n <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        return ys[-1] * n / xs[-1]  # beyond the grid: proportional (pessimistic)


def _curve_path(target, context: int) -> Path:
    cfg = target.model.config
    ident = json.dumps([getattr(cfg, "_name_or_path", ""), cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers,
                        cfg.vocab_size, str(target.dtype), str(target.device), torch.get_num_threads(), context])
    return cache_root() / "costs" / (hashlib.sha1(ident.encode()).hexdigest()[:16] + ".json")


def measure_cost_curve(target, context: int = 256, repeats: int = 5, sizes=SIZES, use_cache: bool = True) -> CostCurve:
    """Median verify time per tree size over a `context`-token prefix (random tokens, random trees)."""
    path = _curve_path(target, context)
    if use_cache and path.exists():
        data = json.loads(path.read_text())
        return CostCurve(data["sizes"], data["seconds"])
    print(f"featspec: measuring the verify cost curve once (cached at {path})", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    sizes = [s for s in sizes if context + s < target.max_length]
    seconds = []
    for n in sizes:
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        tree = DraftTree(torch.randint(0, vocab, (n,), generator=gen).tolist(), parents)
        times = []
        for r in range(repeats + 1):
            target.prefill(prompt)
            t0 = time.perf_counter()
            target.verify(tree, hidden=True)
            if target.device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # the first run warms up kernels for this shape
                times.append(time.perf_counter() - t0)
        seconds.append(statistics.median(times))
    curve = CostCurve(list(sizes), seconds)
    write_json({"sizes": curve.sizes, "seconds": seconds, "context": context}, path)  # raw medians
    return curve


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

    curve: CostCurve
    min_nodes: int = 1
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
