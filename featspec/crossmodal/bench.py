"""`featspec xmodal bench`: the video target alone vs cross-modal drafting, interleaved per clip."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from featspec.crossmodal.adapters import LEVELS
from featspec.crossmodal.qa import question_for
from featspec.crossmodal.vlm import VLM, to_pixels
from featspec.crossmodal.world import SplitData
from featspec.drafters.crossmodal import CrossModalDrafter
from featspec.engine import SpeculativeGenerator
from featspec.errors import FeatspecError
from featspec.models.target import TargetModel

METHODS = ("target", "xmodal-token", *(f"xmodal-{lv}" for lv in LEVELS))


def check_methods(methods: list[str], adapters: dict) -> None:
    for m in methods:
        if m not in METHODS:
            raise FeatspecError(f"unknown xmodal method '{m}': use some of {', '.join(METHODS)}")
        if m.startswith("xmodal-L") and m[7:] not in adapters:
            raise FeatspecError(f"no trained adapter for {m}: run `featspec xmodal train-adapter --level {m[7:]}`")
    if "target" not in methods:
        raise FeatspecError("--methods must include target: speedup and exact_match are measured against it")


def _one(method: str, target: VLM, drafter: VLM, adapters: dict, frames, events, question: str, max_new: int,
         draft_length: int) -> dict:
    inputs = target.inputs(frames, question)
    if method == "target":
        t0 = time.perf_counter()
        ids = target.generate(frames, question, max_new)
        return {"ids": ids, "seconds": time.perf_counter() - t0, "steps": None}
    adapter = None if method == "xmodal-token" else adapters[method[7:]]
    d = CrossModalDrafter(drafter, drafter.prompt_ids(question), to_pixels(events, drafter.image_size)[None],
                          target.model.lm_head, adapter, draft_length, target.model.config.video_token_id)
    gen = SpeculativeGenerator(TargetModel(target.model), d, target.eos_ids)
    t0 = time.perf_counter()
    out = gen.generate(inputs["input_ids"][0].tolist(), max_new,
                       prefill_inputs={"pixel_values_videos": inputs["pixel_values_videos"]})
    seconds = time.perf_counter() - t0
    ids = out.new_ids[:-1] if out.new_ids and out.new_ids[-1] in target.eos_ids else out.new_ids
    return {"ids": ids, "seconds": seconds, "steps": out.steps, "prefill_s": out.prefill_s,
            "committed": sum(s.committed for s in out.steps), "draft_s": sum(s.draft_s for s in out.steps),
            "verify_s": sum(s.verify_s for s in out.steps)}


def run_bench(target: VLM, drafter: VLM, adapters: dict, data: SplitData, methods: list[str], limit: int,
              max_new_tokens: int = 64, draft_length: int = 4, warmup: int = 1, progress: bool = True) -> dict:
    """Every method on every clip, the order rotating per clip, after `warmup` clips run and discarded."""
    from tqdm import tqdm

    check_methods(methods, adapters)
    rec = {m: {"seconds": 0.0, "tokens": 0, "exact": 0, "steps": 0, "committed": 0, "prefill_s": 0.0, "draft_s": 0.0,
               "verify_s": 0.0} for m in methods}
    for i in tqdm(range(limit + warmup), desc="xmodal bench", disable=not progress):
        j = i % len(data.scenes)
        q = question_for(data.scenes[j], j).question
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        outs = {m: _one(m, target, drafter, adapters, data.frames[j], data.event_images[j], q, max_new_tokens, draft_length)
                for m in order}
        if i < warmup:
            continue
        ref = outs["target"]["ids"]
        for m, o in outs.items():
            r = rec[m]
            r["seconds"] += o["seconds"]
            r["tokens"] += len(o["ids"])
            r["exact"] += int(o["ids"] == ref)
            if o["steps"] is not None:
                r["steps"] += len(o["steps"])
                r["committed"] += o["committed"]
                for k in ("prefill_s", "draft_s", "verify_s"):
                    r[k] += o[k]
    base = rec["target"]["tokens"] / rec["target"]["seconds"]
    result = {}
    for m, r in rec.items():
        tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
        result[m] = {"tokens_per_s": round(tps, 2), "speedup": round(tps / base, 3), "exact_match": r["exact"] / limit,
                     "tau": round(r["committed"] / r["steps"], 3) if r["steps"] else None,
                     "time_breakdown_s": {k: round(r[k], 3) for k in ("prefill_s", "draft_s", "verify_s")},
                     "seconds": round(r["seconds"], 3), "tokens": r["tokens"]}
    return result


def markdown(result: dict) -> str:
    lines = ["| method | tok/s | speedup | tau | exact | target prefill s | drafting s | verify s |", "|---|---|---|---|---|---|---|---|"]
    for m, r in result.items():
        tb = r["time_breakdown_s"]
        tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(f"| {m} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {tau} | {r['exact_match']:.2f} | "
                     f"{tb['prefill_s']:.2f} | {tb['draft_s']:.2f} | {tb['verify_s']:.2f} |")
    return "\n".join(lines)
