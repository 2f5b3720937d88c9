"""Never slower than plain decoding: the engine's guard decides, step by step, whether to draft at all.

Speculation pays when tau * T(1) / T(step) > 1: the tokens a drafted step commits, per second of drafting,
verifying and bookkeeping, against one token per plain step. Both sides are measured in the run itself:
a drafted step's committed tokens and seconds, a plain step's seconds (the engine records them anyway).
Before a plain step has been measured, the cost model's 1-token verify time stands in for it, and a
predicted speedup below 1 (the cost model with the acceptance prior, `cost.predict`) starts the run
plain.

The first `warmup` drafted steps of a generator are not judged (a process's first forwards of each tree
shape build kernels and run slow). While the running speedup over the last `window` drafted steps is below 1, the engine decodes `backoff`
steps without drafts (the root alone: one ordinary decoding step), then probes speculation again for
`window` steps; every failed probe doubles the backoff (up to `max_backoff`), a good one resets it. A plain
step commits exactly the token a drafted step would have (greedy: the argmax; sampling: a draw from the
same processed distribution), so the output never depends on the guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Guard:
    window: int = 8  # drafted steps a decision rests on
    backoff: int = 16  # plain steps after a failed probe (doubles per consecutive failure)
    max_backoff: int = 512
    plain_prior_s: float | None = None  # a plain step's seconds before one is measured (the cost model's T(1))
    predicted: float | None = None  # the cost model's predicted speedup; < 1 starts plain
    keep: float = 0.95  # weight of older measurements in the running means (~20 steps)
    warmup: int = 8  # first drafted steps of a generator, not judged: kernels for new tree shapes are being built
    # state
    plain_left: int = 0  # plain steps still to run before the next probe
    reason: str = ""  # why the current plain stretch runs: "predicted" or "measured"
    _spec_tokens: float = 0.0
    _spec_s: float = 0.0
    _spec_n: int = 0  # drafted steps since the last decision
    _plain_s: float | None = None
    _failures: int = 0
    counts: dict = field(default_factory=dict)  # plain steps by reason: predicted | measured | measure
    log: list = field(default_factory=list)  # (step index, decision, measured speedup) for reports and tests

    def __post_init__(self) -> None:
        if self.predicted is not None and self.predicted < 1.0:
            self.plain_left, self.reason = self.backoff, "predicted"

    def drafting(self) -> bool:
        """Should the next step draft?"""
        return self.plain_left == 0

    def plain_s(self) -> float | None:
        return self._plain_s if self._plain_s is not None else self.plain_prior_s

    def speedup(self) -> float | None:
        """Running measured speedup of drafted steps over plain ones (None until both sides are known)."""
        plain = self.plain_s()
        if plain is None or self._spec_s <= 0:
            return None
        return (self._spec_tokens / self._spec_s) * plain

    def record(self, drafted: bool, committed: int, seconds: float) -> None:
        """Feed back one step: was it drafted, the tokens it committed, its seconds from draft to commit."""
        if not drafted:
            self._plain_s = seconds if self._plain_s is None else self.keep * self._plain_s + (1 - self.keep) * seconds
            self.counts[self.reason] = self.counts.get(self.reason, 0) + 1
            self.plain_left -= 1
            if self.plain_left == 0:  # probe: fresh evidence for the next decision
                self._spec_tokens = self._spec_s = 0.0
                self._spec_n = 0
            return
        if self.warmup > 0:
            self.warmup -= 1
            return
        self._spec_tokens = self.keep * self._spec_tokens + committed
        self._spec_s = self.keep * self._spec_s + seconds
        self._spec_n += 1
        if self._spec_n < self.window:
            return
        ratio = self.speedup()
        self._spec_n = 0
        if ratio is None:  # no plain step measured and no cost model: time two to compare against
            self.plain_left, self.reason = 2, "measure"
            return
        if ratio < 1.0:
            self._failures += 1
            self.plain_left = min(self.max_backoff, self.backoff * 2 ** (self._failures - 1))
            self.reason = "measured"
            self.log.append(("plain", ratio))
        else:
            self._failures = 0
            self.log.append(("draft", ratio))

    def stats(self) -> dict:
        return {"plain_steps": dict(self.counts), "decisions": [(d, round(r, 3)) for d, r in self.log]}
