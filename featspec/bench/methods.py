"""Benchmark methods: HF's own generation (the baseline) and every featspec drafter, one interface."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from featspec.drafters import DRAFT_METHODS, DraftOptions
from featspec.engine import GenerationResult
from featspec.models.tokens import eos_token_ids
from featspec.errors import FeatspecError
from featspec.models.registry import LoadedModel
from featspec.drafters.runtime import build_generator
from featspec.sampling import SamplingConfig

HF_METHODS = ("hf", "hf-pld")
# Variants of a drafter, so one run times them side by side (interleaved) instead of comparing two runs:
# *-fixed use --budget fixed (the default is auto), *-auto force --budget auto whatever --budget says,
# *-lookup graft prompt lookup onto the tree (--lookup), *-noguard turn the never-slower guard off
VARIANTS: dict[str, tuple[str, dict]] = {
    "eagle2-auto": ("eagle2", {"budget": "auto"}),
    "eagle3-auto": ("eagle3", {"budget": "auto"}),
    "eagle2-fixed": ("eagle2", {"budget": "fixed"}),
    "eagle3-fixed": ("eagle3", {"budget": "fixed"}),
    "eagle3-noguard": ("eagle3", {"guard": False}),
    "eagle3-lookup": ("eagle3", {"lookup": True}),
    "eagle3-auto-lookup": ("eagle3", {"budget": "auto", "lookup": True}),
    "eagle3-fixed-lookup": ("eagle3", {"budget": "fixed", "lookup": True}),
    "block-lookup": ("block", {"lookup": True}),
    "block-fixed": ("block", {"budget": "fixed"}),
}
# llama.cpp beside featspec (featspec/llamacpp): the target alone, and with the EAGLE-3 head as draft
from featspec.llamacpp.bench import LLAMACPP_METHODS  # noqa: E402

METHODS = HF_METHODS + DRAFT_METHODS + tuple(VARIANTS) + LLAMACPP_METHODS
PLD_TOKENS = 10  # transformers' documented prompt_lookup_num_tokens example value


@dataclass
class RunRecord:
    """One generation call: output ids and wall time, plus engine step stats when available."""

    new_ids: list[int]
    seconds: float
    result: GenerationResult | None = None
    extra: dict = field(default_factory=dict)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise FeatspecError(f"--methods is empty: pass a comma list from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise FeatspecError(f"unknown method '{m}': use a comma list from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise FeatspecError(f"--methods lists a method twice: {text}")
    return methods


class HFMethod:
    """transformers `generate` (greedy or sampling), optionally with its prompt lookup decoding."""

    def __init__(self, name: str, lm: LoadedModel, sampling: SamplingConfig):
        from transformers import GenerationConfig

        self.name, self.lm, self.sampling = name, lm, sampling
        eos = eos_token_ids(lm.model, lm.tokenizer)
        pad = getattr(lm.tokenizer, "pad_token_id", None)
        kwargs: dict = {"eos_token_id": eos or None, "pad_token_id": pad if pad is not None else (eos[0] if eos else 0)}
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
        if name == "hf-pld":
            kwargs["prompt_lookup_num_tokens"] = PLD_TOKENS
        self.config = GenerationConfig(**kwargs)

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunRecord:
        x = torch.tensor([prompt_ids], device=self.lm.device)
        self.config.max_new_tokens = max_new_tokens
        torch.manual_seed(seed)  # HF sampling draws from the global RNG
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.lm.model.generate(x, attention_mask=torch.ones_like(x), generation_config=self.config)
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize()
        return RunRecord(out[0, len(prompt_ids):].tolist(), time.perf_counter() - t0)


class EngineMethod:
    """featspec's SpeculativeGenerator with one drafter."""

    def __init__(self, name: str, lm: LoadedModel, sampling: SamplingConfig, opts: DraftOptions):
        self.name, self.sampling = name, sampling
        if name in VARIANTS:
            name, changes = VARIANTS[name]
            opts = replace(opts, **changes)
        self.generator = build_generator(name, lm, opts)

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunRecord:
        res = self.generator.generate(prompt_ids, max_new_tokens, self.sampling, seed=seed)
        return RunRecord(res.new_ids, res.total_s, res)


def base_method(name: str) -> str:
    """The drafter a bench method runs (a variant's base), e.g. eagle3 for eagle3-lookup."""
    return VARIANTS[name][0] if name in VARIANTS else name


def build_method(name: str, lm: LoadedModel, sampling: SamplingConfig, opts: DraftOptions | None = None,
                 llama=None):
    """`llama`: the run's LlamaCppSession, which serves the llamacpp* methods."""
    if name in HF_METHODS:
        return HFMethod(name, lm, sampling)
    if name in LLAMACPP_METHODS:
        from featspec.llamacpp.bench import LlamaCppMethod

        return LlamaCppMethod(name, llama, sampling)
    return EngineMethod(name, lm, sampling, opts or DraftOptions())
