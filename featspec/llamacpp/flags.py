"""The llama.cpp draft settings that pay for a head on this machine, or none.

llama.cpp verifies k tokens at nearly k times the cost of one on a small CPU model (its kernels have no Python
overhead to hide the arithmetic behind), so whether a head pays depends on the head, the target and the
machine. featspec measures instead of guessing: a short sweep of `--spec-draft-n-max` x `--spec-draft-p-min`
against the target alone, interleaved on the same prompts, and the fastest setting wins only if it beats the
target alone by a margin; otherwise the advice is to run without the head (never slower).
llama-bench's step costs explain the result: T(k) to verify k tokens, the drafting cost per step derived from
the sweep, and the mean accepted length a head would need for a given speedup.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from featspec.errors import FeatspecError
from featspec.llamacpp.server import LlamaServer
from featspec.llamacpp.source import binary

N_MAX = (1, 2, 3, 4, 6, 8)
P_MIN = (0.0, 0.5, 0.8)
MARGIN = 1.03  # a setting must beat the target alone by 3 % in the sweep to be chosen over no draft
GOAL = 1.3


def cli_flags(flags: dict) -> str:
    """llama-server's command-line form of draft flags."""
    return f"--spec-draft-n-max {flags['n_max']} --spec-draft-n-min 0 --spec-draft-p-min {flags['p_min']:g}"


@dataclass
class Setting:
    n_max: int
    p_min: float
    tokens: int = 0
    seconds: float = 0.0
    drafts: int = 0
    accepted: int = 0
    drafted: int = 0
    gen_ms: float = 0.0

    def flags(self) -> dict:
        return {"n_max": self.n_max, "n_min": 0, "p_min": self.p_min}

    def cli(self) -> str:
        return cli_flags(self.flags())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float | None:
        return 1 + self.accepted / self.drafts if self.drafts else None


@dataclass
class FlagChoice:
    """The sweep's verdict: `flags` None means no setting beat the target alone (run without the head)."""

    flags: dict | None
    cli: str
    plain_tokens_per_s: float
    best_ratio: float
    sweep: list[dict] = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    given: bool = False  # set by --llama-cpp-draft, not measured

    def summary(self) -> str:
        if self.given:
            return f"llama.cpp draft flags as given: {self.cli}" if self.flags else "llama.cpp runs without the head, as given"
        if self.flags is None:
            return (f"no llama.cpp draft setting beat the target alone (best {self.best_ratio:.2f}x over "
                    f"{len(self.sweep)} settings): run llama.cpp without the head")
        return f"llama.cpp draft flags that pay here: {self.cli} ({self.best_ratio:.2f}x the target alone in the sweep)"

    def to_json(self) -> dict:
        return asdict(self)


def grid() -> list[Setting]:
    """Draft lengths at p_min 0, and the two longest cut short by draft confidence."""
    return [Setting(n, 0.0) for n in N_MAX] + [Setting(n, p) for n in (4, 8) for p in P_MIN if p > 0]


def sweep(plain: LlamaServer, start_drafted: Callable[[dict], LlamaServer], prompts: list[list[int]],
          n_predict: int = 64, settings: list[Setting] | None = None, progress=None) -> FlagChoice:
    """Time every setting against the target alone on the same prompts, each request paired with a plain one
    (llama-server takes draft flags only at start, so each setting gets its own server, one at a time)."""
    if not prompts:
        raise FeatspecError("the flag sweep needs at least one prompt")
    settings = settings or grid()
    rows = []
    plain.complete(prompts[0], 16)  # warm-up
    for s in settings:
        base = Setting(0, 0.0)
        with start_drafted(s.flags()) as drafted:
            drafted.complete(prompts[0], 16)
            for i, ids in enumerate(prompts):
                pair = [(base, plain), (s, drafted)]
                for setting, server in (pair if i % 2 == 0 else pair[::-1]):
                    c = server.complete(ids, n_predict)
                    setting.tokens += len(c.ids)
                    setting.seconds += c.seconds
                    setting.drafts += c.drafts
                    setting.accepted += c.accepted
                    setting.drafted += c.drafted
                    setting.gen_ms += float(c.timings.get("predicted_ms", 0.0))
                if progress is not None:
                    progress()
        rows.append({"n_max": s.n_max, "p_min": s.p_min, "tokens_per_s": s.tokens_per_s,
                     "plain_tokens_per_s": base.tokens_per_s,
                     "ratio": s.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0,
                     "mean_accepted": s.mean_accepted, "drafts": s.drafts, "drafted": s.drafted, "accepted": s.accepted,
                     "gen_ms": s.gen_ms, "tokens": s.tokens})
    best = max(rows, key=lambda r: r["ratio"])
    plain_tps = sum(r["plain_tokens_per_s"] for r in rows) / len(rows)
    if best["ratio"] >= MARGIN:
        chosen = Setting(best["n_max"], best["p_min"])
        return FlagChoice(chosen.flags(), chosen.cli(), plain_tps, best["ratio"], rows)
    return FlagChoice(None, "(no draft model)", plain_tps, best["ratio"], rows)


def verify_costs(tree: Path, model: Path, threads: int = 2, depth: int = 256, sizes=(1, 2, 3, 4, 5, 7, 9)) -> dict[int, float]:
    """llama-bench's seconds to run k tokens through the target at a context of `depth` (a verify of k-1 drafts)."""
    cmd = [str(binary(tree, "llama-bench")), "-m", str(model), "-p", ",".join(map(str, sizes)), "-n", "0",
           "-d", str(depth), "-t", str(threads), "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FeatspecError(f"llama-bench failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    rows = json.loads(proc.stdout)
    return {int(r["n_prompt"]): float(r["avg_ns"]) / 1e9 for r in rows}


def explain(choice: FlagChoice, costs: dict[int, float], goal: float = GOAL) -> dict:
    """Per n_max (p_min 0): seconds of a drafted step, what drafting costs in it, and the mean accepted length a
    head would need for `goal` x the target alone (accepted length L costs one step and replaces L plain steps)."""
    t1 = costs.get(1)
    out = {"verify_s": {str(k): v for k, v in sorted(costs.items())}, "goal": goal, "per_n_max": []}
    if not t1:
        return out
    for row in choice.sweep:
        if row["p_min"] != 0.0 or not row["drafts"]:
            continue
        plain_steps = max(0, row["tokens"] - row["accepted"] - row["drafts"] - 1)
        step_s = max(1e-9, (row["gen_ms"] / 1e3 - plain_steps * t1) / row["drafts"])
        k = row["n_max"] + 1
        verify = costs.get(k)
        out["per_n_max"].append({
            "n_max": row["n_max"], "step_s": step_s, "verify_s": verify,
            "draft_s": (step_s - verify) if verify else None,
            "mean_accepted": row["mean_accepted"], "needed_mean_accepted": goal * step_s / t1,
            "max_mean_accepted": k,
        })
    choice.costs = out
    return out


def cost_lines(costs: dict) -> list[str]:
    """Human-readable lines of `explain`'s table."""
    v = costs.get("verify_s") or {}
    if not v:
        return []
    t1 = v.get("1")
    lines = ["llama.cpp verify cost (llama-bench, context 256): "
             + ", ".join(f"T({k})={s * 1e3:.1f} ms ({s / t1:.2f}x)" for k, s in v.items())]
    for r in costs.get("per_n_max", []):
        draft = f"{r['draft_s'] * 1e3:.1f} ms" if r["draft_s"] is not None else "?"
        lines.append(f"  n_max {r['n_max']}: step {r['step_s'] * 1e3:.1f} ms (drafting {draft}), mean accepted "
                     f"{r['mean_accepted']:.2f}; {costs['goal']}x needs {r['needed_mean_accepted']:.2f} "
                     f"(at most {r['max_mean_accepted']} possible)")
    return lines
