"""`featspec bench`: every method on every prompt (all turns), on the interleaved harness (`harness.py`).

Speed is reported as a ratio to `hf` from the same run, never as a number from elsewhere; exactness of greedy
output against `hf` (llama.cpp's own methods against `llamacpp`), with where outputs part.
"""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch

from featspec.data import Sample
from featspec.bench.harness import interleave
from featspec.bench.methods import RunRecord, build_method
from featspec.llamacpp.bench import LLAMACPP_METHODS
from featspec.drafters import DraftOptions
from featspec.errors import FeatspecError
from featspec.models.registry import LoadedModel
from featspec.models.tokens import encode_messages, encode_text, has_chat_template
from featspec.sampling import SamplingConfig


@dataclass
class MethodTotals:
    outputs: list[list[list[int]]] = field(default_factory=list)  # per sample, per turn
    new_tokens: int = 0
    seconds: float = 0.0
    committed: int = 0  # tokens committed by verification steps (prefill token excluded)
    steps: int = 0  # drafted verification steps
    plain: Counter = field(default_factory=Counter)  # steps the guard ran without drafts, by reason
    plain_s: float = 0.0
    tree_nodes: int = 0
    accepted_hist: Counter = field(default_factory=Counter)
    reached: Counter = field(default_factory=Counter)  # depth d -> steps whose tree reached d with depth d-1 accepted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    book_s: float = 0.0

    def add(self, rec: RunRecord) -> None:
        self.new_tokens += len(rec.new_ids)
        self.seconds += rec.seconds
        res = rec.result
        if "drafts" in rec.extra:  # llama.cpp: drafted steps and accepted tokens from its counters
            self.steps += rec.extra["drafts"]
            self.committed += rec.extra["accepted"] + rec.extra["drafts"]
        if res is None:
            return
        self.prefill_s += res.prefill_s
        for s in res.steps:
            self.draft_s += s.draft_s
            self.verify_s += s.verify_s
            self.book_s += s.book_s
            if s.plain:
                self.plain[s.plain] += 1
                self.plain_s += s.draft_s + s.verify_s + s.book_s
                continue
            self.steps += 1
            self.committed += s.committed
            self.tree_nodes += s.tree_size
            self.accepted_hist[s.accepted] += 1
            for d in range(1, min(s.accepted + 1, s.tree_depth) + 1):
                self.reached[d] += 1


def prompt_ids_for(lm: LoadedModel, sample: Sample, history: list[dict[str, str]]) -> list[int]:
    if not has_chat_template(lm.tokenizer) and sample.plain is not None and len(sample.turns) == 1:
        return encode_text(lm.tokenizer, sample.plain)
    return encode_messages(lm.tokenizer, history)


def run_bench(
    lm: LoadedModel,
    samples: list[Sample],
    methods: list[str],
    max_new_tokens: int,
    sampling: SamplingConfig,
    seed: int = 0,
    opts: DraftOptions | None = None,
    warmup: int = 1,
    config_extra: dict | None = None,
    llama: dict | None = None,
) -> dict:
    """Run the benchmark and return the JSON-ready report. `llama`: LlamaCppSession arguments (dir, draft,
    tune prompts) for the llamacpp* methods; their servers are stopped on every exit path."""
    if not samples:
        raise FeatspecError("the dataset selection is empty: raise --limit or pick another dataset")
    opts = opts or DraftOptions()
    session = None
    if any(m in LLAMACPP_METHODS for m in methods):
        from featspec.llamacpp.bench import LlamaCppSession

        llama = dict(llama or {})
        session = LlamaCppSession(lm, llama.pop("dir", None), opts.head, **llama)
    try:
        runners = {m: build_method(m, lm, sampling, opts, session) for m in methods}
        report = _run(lm, samples, methods, runners, max_new_tokens, sampling, seed, warmup)
    finally:
        if session is not None:
            session.close()
    extra = dict(config_extra or {})
    if session is not None:
        extra["llamacpp"] = session.report()
    return make_report(lm, samples, methods, report, max_new_tokens, sampling, seed, opts, extra)


def _run(lm, samples, methods, runners, max_new_tokens, sampling, seed, warmup) -> dict[str, MethodTotals]:
    totals = {m: MethodTotals() for m in methods}
    warm_ids = prompt_ids_for(lm, samples[0], [{"role": "user", "content": samples[0].turns[0]}])

    def run(m: str, item: tuple[int, Sample], warm: bool) -> None:
        if warm:  # the first prompt's first turn, short: kernels built, nothing recorded
            runners[m].run(warm_ids, min(32, max_new_tokens), seed)
            return
        i, sample = item
        history: list[dict[str, str]] = []
        outs: list[list[int]] = []
        for turn in sample.turns:
            history.append({"role": "user", "content": turn})
            rec = runners[m].run(prompt_ids_for(lm, sample, history), max_new_tokens, seed + i)
            totals[m].add(rec)
            outs.append(rec.new_ids)
            history.append({"role": "assistant", "content": lm.tokenizer.decode(rec.new_ids, skip_special_tokens=True)})
        totals[m].outputs.append(outs)

    interleave(list(enumerate(samples)), methods, run, warmup=[(0, samples[0])] * warmup, desc="bench",
               status=lambda m: f"{m} {totals[m].new_tokens / max(totals[m].seconds, 1e-9):.1f} tok/s")
    return totals


def make_report(lm, samples, methods, totals, max_new_tokens, sampling, seed, opts: DraftOptions, extra) -> dict:
    base = totals.get("hf")
    base_tps = base.new_tokens / base.seconds if base and base.seconds > 0 else None
    llama = totals.get("llamacpp")
    llama_tps = llama.new_tokens / llama.seconds if llama and llama.seconds > 0 else None

    def agree(t: MethodTotals, ref: MethodTotals | None) -> float | None:
        if ref is None or not sampling.greedy:
            return None
        return sum(a == b for a, b in zip(t.outputs, ref.outputs)) / len(samples)

    def divergences(t: MethodTotals, ref: MethodTotals | None) -> list[dict] | None:
        """Where greedy outputs part from the reference: sample, turn, position, both tokens, and the shared
        prefix (so a tie in the target's logits can be told from a bug)."""
        if ref is None or not sampling.greedy:
            return None
        out = []
        for s, ours, theirs in zip(samples, t.outputs, ref.outputs):
            for turn, (a, b) in enumerate(zip(ours, theirs)):
                if a != b:
                    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    out.append({"sample": s.id, "turn": turn, "at": i, "token": a[i] if i < len(a) else None,
                                "ref_token": b[i] if i < len(b) else None, "prefix": a[:i]})
                    break
        return out

    report_methods = {}
    for m in methods:
        t = totals[m]
        tps = t.new_tokens / t.seconds if t.seconds > 0 else 0.0
        drafts = m not in ("hf", "hf-pld", "vanilla", "llamacpp")
        engine = m not in LLAMACPP_METHODS  # featspec's engine: tree stats and the guard
        # lossless check within one engine: llamacpp-eagle3 against llamacpp (two engines' kernels may round
        # differently, so agreement with hf is reported beside it); everything else against hf
        ref = llama if m == "llamacpp-eagle3" and llama is not None else base
        exact = agree(t, ref)
        hist = {str(k): v for k, v in sorted(t.accepted_hist.items())}
        accepted_at = Counter()
        for k, v in t.accepted_hist.items():
            for d in range(1, k + 1):
                accepted_at[d] += v
        # n-alpha: P(depth d accepted | depth d-1 accepted and the tree had a node at depth d)
        by_depth = [accepted_at[d] / t.reached[d] for d in sorted(t.reached) if t.reached[d]]
        report_methods[m] = {
            "tokens_per_s": tps,
            "speedup": tps / base_tps if base_tps else None,
            "tau": (t.committed / t.steps) if drafts and t.steps else None,
            "exact_match": exact,
            "divergences": divergences(t, ref) if exact is not None and exact < 1 else None,
            "agreement_with_hf": agree(t, base) if m in LLAMACPP_METHODS else None,
            "speedup_vs_llamacpp": tps / llama_tps if llama_tps else None,
            "new_tokens": t.new_tokens,
            "prompts": len(samples),
            "seconds": t.seconds,
            "verify_forwards": ((t.steps + sum(t.plain.values())) or None) if engine else None,  # drafted and plain
            "mean_tree_size": (t.tree_nodes / t.steps) if t.steps and engine else None,
            "accepted_length_hist": hist if drafts and engine else None,
            "accept_by_depth": by_depth if drafts and engine else None,
            # the never-slower guard: steps run without drafts, why (predicted / measured slower, or timing a
            # plain step to compare with), and their seconds; tau above counts drafted steps only
            "guard": {"plain_steps": sum(t.plain.values()), "by_reason": dict(t.plain), "plain_s": t.plain_s,
                      "drafted_steps": t.steps} if drafts and engine else None,
            "time_breakdown_s": None if t.steps + sum(t.plain.values()) == 0 else {
                "prefill": t.prefill_s, "draft": t.draft_s, "verify": t.verify_s, "bookkeeping": t.book_s,
            },
        }
    config = {
        "target": lm.spec,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": seed,
        "methods": methods,
        # depth / total_tokens as used: fixed-budget methods, and the ceilings of --budget auto and *-auto methods
        "draft_options": {**asdict(opts), **dict(zip(("depth", "total_tokens"), opts.tree_shape()))},
        "auto_ceilings": dict(zip(("depth", "total_tokens"), replace(opts, budget="auto").tree_shape())),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "sample_ids": [s.id for s in samples],
    }
    config["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    config.update(extra or {})
    return {"config": config, "methods": report_methods}
