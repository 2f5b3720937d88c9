"""`--budget auto`: choose how many draft nodes to verify at every step.

The target's verify cost as a function of the number of tree nodes is measured once per
(model, dtype, device, threads) and cached as JSON. At each step the drafter's nodes, sorted by
cumulative draft log-probability s_i, promise E(n) = 1 + sum_{i<=n} exp(s_i) committed tokens
(EAGLE-2's observation: draft confidence tracks acceptance). The budget keeps the n that maximises
E(n) / (cost(n + 1) + overhead), where the overhead (drafting and bookkeeping per step) is a
running mean the engine's timings feed in. A running calibration factor (accepted / predicted
tokens) corrects an over- or under-confident head.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featspec.models.registry import cache_root
from featspec.tree import DraftTree

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class CostCurve:
    """Seconds per verify forward at each measured tree size; linear in between."""

    sizes: list[int]
    seconds: list[float]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({"sizes": curve.sizes, "seconds": curve.seconds, "context": context}, fh)
    os.replace(tmp, path)
    return curve


@dataclass
class Budget:
    """Per-step node budget from draft confidence and the measured cost curve."""

    curve: CostCurve
    overhead_s: float = 0.0  # running mean of draft + bookkeeping time per step
    calibration: float = 1.0  # running ratio of accepted to predicted draft tokens
    min_nodes: int = 1
    history: list[int] = field(default_factory=list)
    _predicted: float = 0.0

    def choose(self, scores: list[float], limit: int) -> int:
        """Number of score-sorted nodes to keep (at most `limit`)."""
        best_n, best_rate, expected = 0, 1.0 / (self.curve(1) + self.overhead_s), 0.0
        predicted_at_best = 0.0
        for n, s in enumerate(scores[:limit], start=1):
            expected += min(1.0, self.calibration * math.exp(s))
            rate = (1.0 + expected) / (self.curve(n + 1) + self.overhead_s)
            if rate > best_rate or n <= self.min_nodes:
                best_n, best_rate, predicted_at_best = n, rate, expected
        self._predicted = predicted_at_best
        self.history.append(best_n)
        return best_n

    def update(self, accepted: int, overhead_s: float) -> None:
        """Feed back one step's outcome (draft tokens accepted, seconds outside the verify forward)."""
        self.overhead_s = overhead_s if not self.history or self.overhead_s == 0 else 0.9 * self.overhead_s + 0.1 * overhead_s
        if self._predicted > 0:
            ratio = max(0.05, min(2.0, accepted / self._predicted))
            self.calibration = 0.95 * self.calibration + 0.05 * ratio * self.calibration
