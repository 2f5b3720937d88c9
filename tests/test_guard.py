"""The never-slower guard: its decisions from measured step times, and that it never changes the output."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import build_model, llama_config

from featspec.drafters.base import NoDraft
from featspec.drafters.ngram import NgramDrafter
from featspec.engine import SpeculativeGenerator
from featspec.drafters.guard import Guard
from featspec.models.target import TargetModel
from featspec.sampling import SamplingConfig

EOS = [2]


def test_guard_backs_off_when_drafting_measures_slower_and_probes_again():
    g = Guard(window=4, backoff=3, plain_prior_s=1.0, warmup=0)
    assert g.drafting()
    for _ in range(4):  # 1 token per 2 s against 1 token per 1 s plain: 0.5x
        g.record(True, 1, 2.0)
    assert not g.drafting() and g.reason == "measured" and g.speedup() == pytest.approx(0.5)
    for _ in range(3):
        assert not g.drafting()
        g.record(False, 1, 1.0)
    assert g.drafting()  # the probe
    for _ in range(4):  # now 3 tokens per 1.5 s: 2x
        g.record(True, 3, 1.5)
    assert g.drafting() and g.log[-1][0] == "draft"
    for _ in range(2):  # two failed probes in a row: the backoff doubles
        for _ in range(4):
            g.record(True, 1, 3.0)
        left = g.plain_left
        for _ in range(left):
            g.record(False, 1, 1.0)
    assert left == 6 and g.counts["measured"] == 3 + 3 + 6


def test_guard_starts_plain_when_predicted_slower_and_measures_plain_steps():
    g = Guard(window=2, backoff=5, predicted=0.7, warmup=0)
    assert not g.drafting() and g.reason == "predicted"
    for _ in range(5):
        g.record(False, 1, 0.5)
    assert g.drafting() and g.plain_s() == pytest.approx(0.5)
    # without a cost model and without a plain step, the guard times two plain steps before it judges
    blind = Guard(window=2, warmup=0)
    blind.record(True, 2, 1.0)
    blind.record(True, 2, 1.0)
    assert not blind.drafting() and blind.reason == "measure" and blind.plain_left == 2


class SlowNgram(NgramDrafter):
    """Prompt lookup that costs far more than it saves: the guard must notice and stop drafting."""

    def propose(self, ctx):
        time.sleep(0.02)
        return super().propose(ctx)


@pytest.fixture(scope="module")
def tiny():
    return build_model(llama_config(), seed=3)


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_guard_stops_a_slow_drafter_and_keeps_the_output(tiny):
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    guard = Guard(window=4, backoff=8)
    assert guard.warmup == 8  # the first 8 drafted steps are not judged: 4 more make the first decision
    gen = SpeculativeGenerator(TargetModel(tiny), SlowNgram(), EOS, guard=guard)
    res = gen.generate(prompt, 60)
    assert res.new_ids == hf_greedy(tiny, prompt, 60)
    assert res.plain_steps > 0 and guard.counts.get("measured", 0) > 0
    assert all(s.plain in ("", "measure", "measured") for s in res.steps)
    assert res.tau is None or res.tau >= 1.0


def test_plain_steps_sample_exactly_like_plain_decoding(tiny):
    """Under sampling a guard that keeps every step plain draws the same tokens as the engine without drafts,
    from the same seed: plain steps are ordinary decoding steps."""
    prompt = [4, 9, 13, 22]
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    vanilla = SpeculativeGenerator(TargetModel(tiny), NoDraft(), EOS).generate(prompt, 30, cfg, seed=7)
    guard = Guard(predicted=0.5, backoff=10_000)
    guarded = SpeculativeGenerator(TargetModel(tiny), NgramDrafter(), EOS, guard=guard).generate(prompt, 30, cfg, seed=7)
    assert guarded.new_ids == vanilla.new_ids
    assert guarded.plain_steps == len(guarded.steps) and guarded.tau is None
