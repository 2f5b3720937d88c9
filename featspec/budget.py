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
children (the frontier's scores times the head's running top-1 child probability) would raise the
best E / T; after the last level it keeps the n that maximises E(n) / T(n, L).
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
class Budget:
    """Per-step draft depth and node budget from draft confidence, measured costs and feedback.

    Nodes are (score, depth) pairs, score = cumulative draft log-probability."""

    curve: CostCurve
    min_nodes: int = 1
    child_p: float = 0.5  # running mean of a fed node's top-1 child probability
    base_s: float | None = None
    level_s: float | None = None
    other_s: float | None = None
    _pred: dict[int, float] = field(default_factory=dict)  # per depth: running predicted acceptance mass
    _real: dict[int, float] = field(default_factory=dict)  # per depth: running realised acceptance
    _kept: list[tuple[float, int]] = field(default_factory=list)

    def calibration(self, depth: int) -> float:
        """Accepted / predicted at this depth over about the last 20 steps that drafted it; half a step's
        worth of pseudo-counts at ratio 1 makes an unseen depth start trusted and a rarely seen one stable."""
        return (self._real.get(depth, 0.0) + 0.5) / (self._pred.get(depth, 0.0) + 0.5)

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
        """Is drafting one more level (children at `depth` of the `frontier` scores) worth its time?"""
        _, now = self._best(nodes, limit, levels)
        guess = [(s + math.log(max(self.child_p, 1e-6)), depth) for s in frontier]
        _, after = self._best(sorted(nodes + guess, key=lambda x: (-x[0], x[1])), limit, levels + 1)
        return after > now

    def choose(self, nodes: list[tuple[float, int]], limit: int, levels: int = 0) -> int:
        """Number of the score-sorted `nodes` to keep (at most `limit`) after `levels` drafted levels."""
        n, _ = self._best(nodes, limit, levels)
        self._kept = list(nodes[:n])
        return n

    def update(self, accepted: int, base_s: float, level_s: list[float], top1: list[float], gap_s: float | None) -> None:
        """Feed back one step: draft tokens accepted, drafting times (before the first level, per level),
        top-1 child probabilities seen, and the seconds from the end of drafting to the next draft (verify
        and bookkeeping), if known."""
        self.base_s = _ema(self.base_s, base_s)
        for t in level_s:
            self.level_s = _ema(self.level_s, t)
        for p in top1:
            self.child_p = _ema(self.child_p, p, 0.98)
        if gap_s is not None:
            verify = self.curve(len(self._kept) + 1)
            self.other_s = _ema(self.other_s, max(gap_s - verify, -0.5 * verify))
        mass: dict[int, float] = {}
        for s, d in self._kept:
            mass[d] = mass.get(d, 0.0) + math.exp(s)
        self._kept = []  # a step that drafts nothing (the root only) keeps nothing
        for d, m in mass.items():  # 0.95: about the last 20 steps that drafted this deep
            self._pred[d] = 0.95 * self._pred.get(d, 0.0) + 0.05 * min(1.0, m) * 20
            self._real[d] = 0.95 * self._real.get(d, 0.0) + 0.05 * float(accepted >= d) * 20
