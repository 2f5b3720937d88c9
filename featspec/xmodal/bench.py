"""`featspec xmodal bench`: the video target alone vs cross-modal drafting, on the core's interleaved harness."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from featspec.xmodal.drafting.adapters import LEVELS
from featspec.xmodal.world.qa import question_for
from featspec.xmodal.models.vlm import VLM, to_pixels
from featspec.xmodal.world.clips import SplitData
from featspec.xmodal.drafting.drafter import CrossModalDrafter
from featspec.drafters.eagle import FeatureDrafter
from featspec.xmodal.drafting.hybrid import HybridDrafter
from featspec.bench.harness import interleave
from featspec.bench.report import speed_and_tau, table
from featspec.engine import SpeculativeGenerator
from featspec.errors import FeatspecError
from featspec.models.target import TargetModel
from featspec.io import save_figure

METHODS = ("target", "eagle3", "xmodal-token", *(f"xmodal-{lv}" for lv in LEVELS), "xmodal-pp", "hybrid")
PP_LEVEL = "L1"  # the adapter parallel prefill drafts with (L6 cannot: it reads the target's prefill)
EAGLE_TREE = {"depth": 5, "topk": 4, "total_tokens": 10}  # EAGLE-2 dynamic tree for the target's own head


@dataclass
class Kit:
    """Everything the methods draft with: the two minis, trained adapters, the target's EAGLE-3 head."""

    target: VLM
    drafter: VLM
    adapters: dict = field(default_factory=dict)
    head: object | None = None
    draft_length: int = 4
    parallel: dict | None = None  # the measured parallel-prefill decision of `hybrid` (parallel_prefill_pays)


def _median_s(fn, repeats: int = 3) -> float:
    """Median wall time of `fn` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parallel_prefill_pays(kit: Kit, frames, events, question: str) -> dict:
    """Does running the drafter's prefill beside the target's pay on this machine? Measured once per kit.

    What it can save is the first drafting step of the target's own head (the drafts are ready when the
    target's prefill ends; later steps are the head's either way). What it costs is the target's prefill
    slowed by the drafter competing for the same cores. Run it only when the saving beats the cost: the
    guard's rule (speculate only where measured faster), applied to the prefill."""
    if kit.parallel is not None:
        return kit.parallel
    t, d = kit.target, kit.drafter
    inputs = t.inputs(frames, question)
    ids = inputs["input_ids"][0].tolist()
    extra = {"pixel_values_videos": inputs["pixel_values_videos"]}
    target = TargetModel(t.model)
    alone = _median_s(lambda: target.prefill(ids, hidden=True, extra=extra))
    xm = CrossModalDrafter(d, d.prompt_ids(question), to_pixels(events, d.image_size)[None], t.model.lm_head,
                           kit.adapters.get(PP_LEVEL), kit.draft_length, t.model.config.video_token_id, parallel=True)

    def both() -> None:
        xm.begin(ids)
        pre = target.prefill(ids, hidden=True, extra=extra)
        xm.start(ids, pre)

    beside = _median_s(both)
    head = FeatureDrafter(kit.head, "eagle3", **EAGLE_TREE)
    from featspec.protocol import DraftContext
    from featspec.sampling import SamplingConfig

    def first_draft() -> float:
        head.start(ids, target.prefill(ids, hidden=True, extra=extra))
        t0 = time.perf_counter()
        head.propose(DraftContext(ids + [0], max_depth=EAGLE_TREE["depth"], sampling=SamplingConfig(), generator=None))
        return time.perf_counter() - t0

    first_draft()  # warm-up
    saving = statistics.median(first_draft() for _ in range(3))
    kit.parallel = {"runs": beside - alone < saving, "prefill_alone_s": round(alone, 4),
                    "prefill_beside_drafter_s": round(beside, 4), "first_draft_s": round(saving, 4)}
    return kit.parallel


def adapter_level(method: str) -> str | None:
    """The adapter a method drafts through (None: raw tokens, the target alone, or its own head)."""
    if method in ("xmodal-pp", "hybrid"):
        return PP_LEVEL
    return method[len("xmodal-"):] if method.startswith("xmodal-L") else None


def check_methods(methods: list[str], kit: Kit) -> None:
    for m in methods:
        if m not in METHODS:
            raise FeatspecError(f"unknown xmodal method '{m}': use some of {', '.join(METHODS)}")
        level = adapter_level(m)
        if level is not None and level not in kit.adapters:
            raise FeatspecError(f"no trained adapter for {m}: run `featspec xmodal train-adapter --level {level}`")
        if m in ("eagle3", "hybrid") and kit.head is None:
            raise FeatspecError(f"{m} needs the target's EAGLE-3 head: run `featspec xmodal train-eagle3`")
    if "target" not in methods:
        raise FeatspecError("--methods must include target: speedup and exact_match are measured against it")


def make_drafter(method: str, kit: Kit, question: str, events):
    """The engine drafter of a method (not `target`, which runs HF generate)."""
    t, d = kit.target, kit.drafter
    if method == "eagle3":
        return FeatureDrafter(kit.head, "eagle3", **EAGLE_TREE)
    parallel = method == "xmodal-pp" or (method == "hybrid" and kit.parallel is not None and kit.parallel["runs"])
    level = adapter_level(method)
    adapter = None if level is None else kit.adapters[level]
    xm = CrossModalDrafter(d, d.prompt_ids(question), to_pixels(events, d.image_size)[None], t.model.lm_head, adapter,
                           kit.draft_length, t.model.config.video_token_id, parallel=parallel)
    if method == "hybrid":  # without parallel prefill the head drafts from the first step: the drafter's would be late
        return HybridDrafter(xm, FeatureDrafter(kit.head, "eagle3", **EAGLE_TREE), switch_after=1 if parallel else 0)
    return xm


def _one(method: str, kit: Kit, frames, events, question: str, max_new: int) -> dict:
    target = kit.target
    inputs = target.inputs(frames, question)
    if method == "target":
        t0 = time.perf_counter()
        ids = target.generate(frames, question, max_new)
        return {"ids": ids, "seconds": time.perf_counter() - t0, "steps": None}
    d = make_drafter(method, kit, question, events)
    gen = SpeculativeGenerator(TargetModel(target.model), d, target.eos_ids)
    t0 = time.perf_counter()
    out = gen.generate(inputs["input_ids"][0].tolist(), max_new,
                       prefill_inputs={"pixel_values_videos": inputs["pixel_values_videos"]})
    seconds = time.perf_counter() - t0
    ids = out.new_ids[:-1] if out.new_ids and out.new_ids[-1] in target.eos_ids else out.new_ids
    xm = d.first if isinstance(d, HybridDrafter) else d if isinstance(d, CrossModalDrafter) else None
    return {"ids": ids, "seconds": seconds, "steps": out.steps, "prefill_s": out.prefill_s,
            "drafter_prefill_s": xm.prefill_s if xm else 0.0, "timeline": _timeline(out, xm, t0),
            "committed": sum(s.committed for s in out.steps), "draft_s": sum(s.draft_s for s in out.steps),
            "verify_s": sum(s.verify_s for s in out.steps)}


def _timeline(out, d: CrossModalDrafter | None, t0: float) -> list[tuple[str, float, float]]:
    """(phase, start, end) in seconds from the call: target prefill, the drafter's overlapped phases, steps."""
    phases = [("target prefill (+ drafter start)", 0.0, out.prefill_s)]
    phases += [(name, a - t0, b - t0) for name, (a, b) in (d.timeline.items() if d is not None else ())]
    t = out.prefill_s
    for s in out.steps:
        phases.append(("drafting", t, t + s.draft_s))
        phases.append(("verification", t + s.draft_s, t + s.draft_s + s.verify_s))
        t += s.draft_s + s.verify_s + s.book_s
    return phases


def run_bench(kit: Kit, data: SplitData, methods: list[str], limit: int, max_new_tokens: int = 64, warmup: int = 1,
              progress: bool = True) -> dict:
    """Every method on every clip on the core's interleaved harness, after `warmup` clips run and discarded."""
    check_methods(methods, kit)
    if "hybrid" in methods:  # measured before any timing: does the drafter's parallel prefill pay here?
        q0 = question_for(data.scenes[0], 0).question
        parallel_prefill_pays(kit, data.frames[0], data.event_images[0], q0)
    n = len(data.scenes)

    def run(m: str, j: int, warm: bool) -> dict:
        q = question_for(data.scenes[j], j).question
        return _one(m, kit, data.frames[j], data.event_images[j], q, max_new_tokens)

    outs = interleave([i % n for i in range(warmup, warmup + limit)], methods, run, warmup=[i % n for i in range(warmup)],
                      desc="xmodal bench", progress=progress)
    parts = ("prefill_s", "drafter_prefill_s", "draft_s", "verify_s")
    ref = outs["target"]
    base = sum(len(o["ids"]) for o in ref) / sum(o["seconds"] for o in ref)
    result = {}
    for m, runs in outs.items():
        seconds, tokens = sum(o["seconds"] for o in runs), sum(len(o["ids"]) for o in runs)
        drafted = [o for o in runs if o["steps"] is not None]
        steps, committed = sum(len(o["steps"]) for o in drafted), sum(o["committed"] for o in drafted)
        tps = tokens / seconds if seconds else 0.0
        result[m] = {"tokens_per_s": round(tps, 2), "speedup": round(tps / base, 3),
                     "exact_match": sum(o["ids"] == r["ids"] for o, r in zip(runs, ref)) / limit,
                     "tau": round(committed / steps, 3) if steps else None,
                     "time_breakdown_s": {k: round(sum(o[k] for o in drafted), 3) for k in parts},
                     "seconds": round(seconds, 3), "tokens": tokens,
                     # one clip's phases, for the timeline plot
                     "timeline_first_clip": [(name, round(a, 4), round(b, 4)) for name, a, b in drafted[0]["timeline"]]
                     if drafted else None}
        if m == "hybrid":
            result[m]["parallel_prefill"] = kit.parallel
    return result


COLUMNS = [("method", None, None), ("tok/s", "tokens_per_s", ".1f"), ("speedup", "speedup", ".2fx"), ("tau", "tau", ".2f"),
           ("exact", "exact_match", ".2f"), ("target prefill s", "time_breakdown_s.prefill_s", ".2f"),
           ("drafter prefill s", "time_breakdown_s.drafter_prefill_s", ".2f"), ("drafting s", "time_breakdown_s.draft_s", ".2f"),
           ("verify s", "time_breakdown_s.verify_s", ".2f")]


def markdown(result: dict) -> str:
    return table(COLUMNS, result)


def plot(result: dict, path: Path, title: str = "") -> None:
    """Speedup and tau per method, and the phases of one clip for each drafting method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1, 2]})
    speed_and_tau(a1, a2, result, "speedup", "speedup vs target (same run)")
    colours = {"drafting": "tab:green", "verification": "tab:red"}
    rows = [m for m in methods if result[m]["timeline_first_clip"]]
    for y, m in enumerate(rows):
        for name, start, end in result[m]["timeline_first_clip"]:
            lane = y + (0.3 if name in ("drafter_prefill", "draft_ahead", "wait_for_drafter") else 0.0)
            a3.barh(lane, end - start, left=start, height=0.25, color=colours.get(name, "tab:purple" if "drafter" in name
                    or name == "draft_ahead" else "tab:grey"))
    a3.set_yticks(range(len(rows)), rows)
    a3.set_xlabel("seconds (first measured clip); grey target prefill, purple drafter's overlapped work, green drafting, red verify")
    a3.set_title("timeline of one clip")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
