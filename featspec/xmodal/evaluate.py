"""`featspec xmodal eval`: answer accuracy per attribute for both minis, visual tokens, prefill latency."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from featspec.xmodal.world.qa import ATTRIBUTES, parse, question_for
from featspec.xmodal.world.scenes import DIRECTIONS, WorldConfig
from featspec.xmodal.models.vlm import VLM, _backbone, MiniSpec, load_mini
from featspec.xmodal.world.clips import build_split
from featspec.errors import FeatspecError

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "xmodal"


def default_models_dir() -> Path:
    """Shipped artifacts when present, else where `featspec xmodal prepare` writes by default."""
    from featspec.models.registry import cache_root

    return SHIPPED if (SHIPPED / "target" / "config.json").exists() else cache_root() / "xmodal"


def load_pair(models: Path, dtype: torch.dtype) -> tuple[VLM, VLM, WorldConfig]:
    """Target and drafter over one shared backbone load, plus the world they were trained on."""
    models = Path(models)
    cfg = models / "target" / "config.json"
    if not cfg.exists():
        raise FeatspecError(f"no mini models in {models}: run `featspec xmodal prepare --out {models}` first")
    meta = json.loads(cfg.read_text())
    backbone = _backbone(MiniSpec(**meta["spec"]))
    target = load_mini(models / "target", dtype, backbone=backbone)
    drafter = load_mini(models / "drafter", dtype, backbone=backbone)
    return target, drafter, WorldConfig.from_json(meta["world"])


def chance(world: WorldConfig) -> dict[str, float]:
    return {"direction": 1 / len(DIRECTIONS), "count": 1 / world.max_objects, "shape": 1 / len(world.shapes),
            "colour": 1 / len(world.colours), "speed": 1 / len(world.speeds)}


@torch.no_grad()
def prefill_ms(vlm: VLM, inputs: dict[str, torch.Tensor]) -> float:
    """Wall time of the prompt forward, vision tower included: what stands before the first token."""
    t = time.perf_counter()
    vlm.model(**inputs, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t) * 1e3


def evaluate(models: Path, split: str = "test", limit: int = 200, dtype: torch.dtype = torch.bfloat16,
             max_new_tokens: int = 64, progress: bool = True) -> dict:
    from tqdm import tqdm

    target, drafter, world = load_pair(models, dtype)
    data = build_split(world, split, limit, progress=progress)
    roles = {"target": (target, data.frames), "drafter": (drafter, data.event_images)}
    hits = {r: {a: [0, 0] for a in ATTRIBUTES} for r in roles}
    timing: dict[str, list[float]] = {r: [] for r in roles}
    samples = []
    for i in tqdm(range(limit), desc=f"eval {split}", disable=not progress):
        qa = question_for(data.scenes[i], i)
        row = {"index": i, "kind": qa.kind, "question": qa.question, "reference": qa.answer}
        for role, (vlm, images) in roles.items():
            inputs = vlm.inputs(images[i], qa.question)
            ms = prefill_ms(vlm, inputs)
            if i >= 2:  # the first calls warm up allocators and kernels
                timing[role].append(ms)
            answer = vlm.tokenizer.decode(vlm.generate(images[i], qa.question, max_new_tokens))
            row[role] = answer
            if qa.kind in ATTRIBUTES:
                ok = parse(answer, qa.kind) == parse(qa.answer, qa.kind)
                hits[role][qa.kind][0] += int(ok)
                hits[role][qa.kind][1] += 1
        samples.append(row)
    result = {"split": split, "limit": limit, "dtype": str(dtype).replace("torch.", ""), "models": str(models)}
    for role in roles:
        result[role] = {"accuracy": {a: (h[0] / h[1] if h[1] else None) for a, h in hits[role].items()},
                        "questions": {a: h[1] for a, h in hits[role].items()}}
    result["chance"] = chance(world)
    result["visual_tokens"] = {"target": target.visual_tokens, "drafter": drafter.visual_tokens}
    result["prefill_ms"] = {r: round(statistics.median(t), 2) if t else None for r, t in timing.items()}
    result["samples"] = samples
    return result


def report_markdown(result: dict) -> str:
    lines = [f"split `{result['split']}`, {result['limit']} clips, {result['dtype']}", "",
             "| attribute | questions | target | drafter | chance |", "|---|---|---|---|---|"]
    for a in ATTRIBUTES:
        t, d = result["target"]["accuracy"][a], result["drafter"]["accuracy"][a]
        fmt = lambda v: "-" if v is None else f"{100 * v:.0f} %"  # noqa: E731
        lines.append(f"| {a} | {result['target']['questions'][a]} | {fmt(t)} | {fmt(d)} | {fmt(result['chance'][a])} |")
    v, p = result["visual_tokens"], result["prefill_ms"]
    lines += ["", f"visual tokens: target {v['target']}, drafter {v['drafter']} ({v['target'] / v['drafter']:.1f}x); "
              f"prefill (median): target {p['target']} ms, drafter {p['drafter']} ms"]
    return "\n".join(lines)
