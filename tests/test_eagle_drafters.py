"""EAGLE drafters in the engine: greedy exactness (LLaMA and Gemma-3 configs), real acceptance from
trained tiny heads, lossless sampling through dynamic trees, and the auto budget's choices."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featspec.drafters.budget import Budget, CostCurve
from featspec.drafters.eagle import DEFAULT_STATIC_TREE, FeatureDrafter
from featspec.drafters.lookup import LookupGraft
from featspec.engine import SpeculativeGenerator
from featspec.heads.eagle1 import Eagle1Head
from featspec.heads.eagle3 import Eagle3Head
from featspec.heads.layers import HeadConfig
from featspec.models.target import TargetModel
from featspec.sampling import SamplingConfig
from featspec.train.losses import eagle1_loss, eagle3_loss, target_batch

from conftest import build_model, gemma3_config, llama_config
from test_sampling_lossless import PROMPT, chi2, exact_joint, run_seeds

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = [2]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def own_text(model, n_seq: int, seed: int, length: int = 40) -> torch.Tensor:
    """The target's own greedy continuations of random prompts: what a head should learn to draft."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, model.config.vocab_size, (n_seq, 6), generator=g)
    with torch.inference_mode():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length,
                              min_new_tokens=length, do_sample=False, pad_token_id=0)


def train_head(model, kind: str, data: torch.Tensor, steps: int = 200, seed: int = 0):
    """Fit a head to `data` (the target's own text); returns (head, losses, agreement before, after).

    Tiny random targets produce text no small head can generalise over, so the test heads memorise a
    few sequences; drafting exactly those prompts then exercises acceptance at depth.
    """
    torch.manual_seed(seed)
    cfg = HeadConfig.from_target(model.config, draft_vocab_size=64 if kind == "eagle3" else 0)
    head = (Eagle3Head(cfg) if kind == "eagle3" else Eagle1Head(cfg)).bind(model)
    if kind == "eagle3":
        head.set_vocab(torch.arange(model.config.vocab_size)[-64:])
    lm_head = model.get_output_embeddings()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    batch = {"input_ids": data, "attention_mask": torch.ones_like(data), "loss_mask": torch.ones_like(data)}
    tb = target_batch(model, head, batch)

    def loss_of(train: bool):
        if kind == "eagle3":
            return eagle3_loss(head, tb, 3, lm_head)
        return eagle1_loss(head, tb, 0.1 if train else 0.0, torch.Generator().manual_seed(0), lm_head)

    with torch.no_grad():
        before = loss_of(False)[1]["acc_0"]
    losses = []
    for _ in range(steps):
        loss, _ = loss_of(True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = loss_of(False)[1]["acc_0"]
    return head.eval(), losses, before, after


@pytest.fixture(scope="module")
def llama():
    return build_model(llama_config(layers=4), seed=0)


@pytest.fixture(scope="module")
def gemma():
    return build_model(gemma3_config(), seed=2)


@pytest.fixture(scope="module")
def trained(llama, gemma):
    """name -> (target, trained eagle1 head, trained eagle3 head, training records, the prompts it knows)."""
    out = {}
    for name, model in (("llama", llama), ("gemma3", gemma)):
        text = own_text(model, 6, seed=0)
        h1, l1, b1, a1 = train_head(model, "eagle1", text)
        h3, l3, b3, a3 = train_head(model, "eagle3", text)
        prompts = text[:, :6].tolist()
        out[name] = (model, h1, h3, {"eagle1": (l1, b1, a1), "eagle3": (l3, b3, a3)}, prompts)
    return out


def drafters(h1, h3, rng: random.Random):
    curve = CostCurve([1, 8, 32, 64], [1.0, 1.1, 1.4, 2.0])  # a GPU-like curve: wide trees are cheap
    return [
        FeatureDrafter(h1, "eagle1", static_tree=DEFAULT_STATIC_TREE),
        FeatureDrafter(h1, "eagle2", depth=rng.randint(1, 6), topk=rng.randint(1, 5), total_tokens=rng.randint(1, 30)),
        FeatureDrafter(h3, "eagle3", depth=rng.randint(1, 6), topk=rng.randint(1, 5), total_tokens=rng.randint(1, 30)),
        FeatureDrafter(h3, "eagle3", depth=5, topk=4, total_tokens=40, budget=Budget(curve)),
        LookupGraft(FeatureDrafter(h3, "eagle3", depth=rng.randint(1, 6), topk=rng.randint(1, 5),
                                   total_tokens=rng.randint(1, 30), budget=Budget(curve) if rng.random() < 0.5 else None),
                    max_extra=rng.randint(1, 16)),
    ]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_heads_learn(trained, name):
    """Training on the target's own text lowers the loss and raises held-out top-1 agreement."""
    for kind, (losses, before, after) in trained[name][3].items():
        assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), (kind, losses[:3], losses[-3:])  # soft CE floors at the entropy
        assert before < 0.2 and after > 0.6, (kind, before, after)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 95), min_size=1, max_size=40), n_new=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_eagle_drafters_greedy_exact(trained, name, prompt, n_new, seed):
    model, h1, h3, _, _ = trained[name]
    ref = hf_greedy(model, prompt, n_new)
    for drafter in drafters(h1, h3, random.Random(seed)):
        target = TargetModel(model)
        res = SpeculativeGenerator(target, drafter, EOS).generate(prompt, n_new)
        assert res.new_ids == ref, (drafter.name, res.new_ids, ref)
        if res.stop_reason == "max_new_tokens":  # on EOS the cache may hold accepted drafts past it: unused
            assert target.length == len(prompt) + len(res.new_ids) - 1  # cache = exactly the committed tokens


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_trained_heads_get_accepted(trained, name):
    """Exactness above is not vacuous: trained heads' drafts are accepted often, at several depths."""
    model, h1, h3, _, prompts = trained[name]
    for drafter in drafters(h1, h3, random.Random(0))[:1] + [FeatureDrafter(h1, "eagle2"), FeatureDrafter(h3, "eagle3")]:
        hist: Counter = Counter()
        for prompt in prompts:
            res = SpeculativeGenerator(TargetModel(model), drafter, EOS).generate(prompt, 40)
            assert res.new_ids == hf_greedy(model, prompt, 40)
            hist.update(s.accepted for s in res.steps)
        steps = sum(hist.values())
        tau = (sum(k * v for k, v in hist.items()) + steps) / steps
        assert tau > 1.8, (drafter.name, hist)
        assert any(k >= 3 for k in hist), (drafter.name, hist)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_lookup_graft_adds_accepted_nodes(trained, name):
    """On text that repeats itself, grafted prompt-lookup nodes are verified and accepted beyond what the
    head's own tree held, the output stays the target's greedy text, and tau beats the head alone."""
    model, _, h3, _, _ = trained[name]
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3
    ref = hf_greedy(model, prompt, 60)
    inner = FeatureDrafter(h3, "eagle3", depth=2, topk=2, total_tokens=3)
    graft = LookupGraft(inner, max_extra=12)
    beyond = []  # per step: accepted tokens the graft added beyond the head's own tree (it tells the head)
    orig = inner.observe
    inner.observe = lambda step: beyond.append(len(step.path) - 1 - step.accepted_own) or orig(step)
    res = SpeculativeGenerator(TargetModel(model), graft, EOS).generate(prompt, 60)
    assert res.new_ids == ref
    assert sum(graft.grafted) > 0 and sum(beyond) > 0, (graft.grafted, beyond)
    plain = SpeculativeGenerator(TargetModel(model), FeatureDrafter(h3, "eagle3", depth=2, topk=2, total_tokens=3), EOS)
    assert res.tau > plain.generate(prompt, 60).tau


def test_dynamic_tree_respects_budget_and_shape(trained):
    model, h1, h3, _, _ = trained["llama"]
    d = FeatureDrafter(h3, "eagle3", depth=4, topk=3, total_tokens=10)
    gen = SpeculativeGenerator(TargetModel(model), d, EOS)
    seen = []
    orig = d.propose
    d.propose = lambda ctx: seen.append(orig(ctx)) or seen[-1]
    gen.generate([5, 6, 7, 8], 30)
    assert seen and all(len(t) <= 11 and t.max_depth() <= 4 for t in seen)
    assert max(len(t) for t in seen) == 11
    for t in seen:  # siblings are distinct tokens (top-k), so the tree never repeats a path
        for kids in t.children:
            assert len({t.tokens[c] for c in kids}) == len(kids)


def test_static_tree_shape(trained):
    model, h1, _, _, _ = trained["llama"]
    d = FeatureDrafter(h1, "eagle1", static_tree=DEFAULT_STATIC_TREE)
    gen = SpeculativeGenerator(TargetModel(model), d, EOS)
    seen = []
    orig = d.propose
    d.propose = lambda ctx: seen.append(orig(ctx)) or seen[-1]
    gen.generate([5, 6, 7, 8], 60)
    full = [t for t in seen if len(t) == len(DEFAULT_STATIC_TREE) + 1]
    assert full, [len(t) for t in seen]
    with pytest.raises(ValueError):
        FeatureDrafter(h1, "bad", static_tree=((0, 0),))  # not prefix-closed


def test_auto_budget_follows_confidence_and_cost():
    def nodes(scores):
        return [(s, 1) for s in scores]

    flat = Budget(CostCurve([1, 64], [1.0, 1.0]))  # free verification: keep everything useful
    assert flat.choose(nodes([-0.1] * 20), 20) == 20
    steep = Budget(CostCurve([1, 64], [1.0, 64.0]))  # cost grows with every node: keep only sure ones
    assert steep.choose(nodes([-0.01, -0.02, -3.0, -4.0]), 4) <= 2
    mid = Budget(CostCurve([1, 8, 64], [1.0, 1.2, 4.0]))
    confident = mid.choose(nodes([-0.05 * i for i in range(1, 40)]), 40)
    unsure = mid.choose(nodes([-2.0 - 0.1 * i for i in range(39)]), 40)
    assert confident > unsure
    assert CostCurve([1, 8], [1.0, 2.0])(4) == pytest.approx(1 + 3 / 7)


def test_cost_curve_is_made_monotone():
    """Timing noise (12 nodes measured faster than 8) must not make a bigger tree look cheaper."""
    curve = CostCurve([1, 8, 12, 16], [1.0, 1.3, 1.1, 1.4])
    assert curve.seconds == pytest.approx([1.0, 1.2, 1.2, 1.4])
    assert all(a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))
    assert CostCurve([1, 2, 4], [3.0, 2.0, 1.0]).seconds == pytest.approx([2.0, 2.0, 2.0])


def test_auto_budget_drafts_deeper_only_when_it_pays():
    b = Budget(CostCurve([1, 64], [1.0, 1.0]))
    kept = [(-0.1, 1), (-0.2, 2)]
    b.update(1, base_s=0.05, level_s=[0.02], top1=[[0.9]], gap_s=None)  # a cheap level, a confident head
    assert b.extend(kept, [-0.2], depth=3, levels=1, limit=8)
    assert not b.extend(kept, [-9.0], depth=3, levels=1, limit=8)  # a frontier nobody believes in
    slow = Budget(CostCurve([1, 64], [1.0, 1.0]))
    slow.update(1, base_s=0.05, level_s=[5.0], top1=[[0.9]], gap_s=None)  # a level costs 5 verify forwards
    assert not slow.extend(kept, [-0.2], depth=3, levels=1, limit=8)


def test_auto_budget_calibrates_per_depth():
    """A head that is right at depth 1 and always wrong at depth 2 loses trust at depth 2 only."""
    b = Budget(CostCurve([1, 64], [1.0, 1.0]))
    for _ in range(40):
        assert b.choose([(-0.05, 1), (-0.1, 2)], 8, levels=1) == 2
        b.update(1, base_s=0.0, level_s=[0.0], top1=[[0.9]], gap_s=2.0)
    assert b.calibration(1) > 0.9 and b.calibration(2) < 0.15
    assert b.other_s == pytest.approx(2.0 - 1.0)  # the gap beyond the curve's verify time
    before = b.calibration(2)
    b.update(0, base_s=0.0, level_s=[], top1=[], gap_s=None)  # a step that kept nothing changes no calibration
    assert b.calibration(1) > 0.9 and b.calibration(2) == before


def test_auto_budget_retries_a_depth_it_switched_off():
    """Depth 2 is only measured while depth-2 nodes are kept: after one bad start the budget must not
    stop keeping them for good (the lock-in that made `--budget auto` differ from run to run)."""
    b = Budget(CostCurve([1, 64], [1.0, 1.0]))
    nodes = [(-0.05, 1), (-0.4, 2)]
    for _ in range(5):  # a bad start at depth 2
        b.choose(nodes, 8, levels=1)
        b.update(1, base_s=0.0, level_s=[0.0], top1=[[0.9]], gap_s=None)
    assert b.calibration(2) < 0.5
    b.curve = CostCurve([1, 2, 3, 64], [1.0, 1.0, 1.25, 2.0])  # a second node costs: worth it only if trusted
    assert b.choose(nodes, 8, levels=1) == 1
    kept_two = 0
    for _ in range(200):
        kept_two += b.choose(nodes, 8, levels=1) == 2
        b.update(1, base_s=0.0, level_s=[0.0], top1=[[0.9]], gap_s=None)
    assert b.calibration(2) > 0.6 and kept_two > 0


def test_auto_budget_child_probability_per_frontier_rank():
    """The best frontier node's children and its weak siblings' are estimated apart, starting from 0.5."""
    b = Budget(CostCurve([1, 64], [1.0, 1.0]))
    assert b.child_p(0) == 0.5
    b.update(0, base_s=0.0, level_s=[0.0], top1=[[0.05, 0.1, 0.1, 0.1]], gap_s=None)
    assert 0.3 < b.child_p(0) < 0.5  # one observation moves it, it does not replace the prior
    for _ in range(100):
        b.update(0, base_s=0.0, level_s=[0.0], top1=[[0.9, 0.1, 0.1, 0.1]], gap_s=None)
    assert b.child_p(0) > 0.8 and b.child_p(3) < 0.2 and b.child_p(7) == 0.5
    for _ in range(300):  # levels no longer drafted: the estimates drift back to the prior
        b.update(0, base_s=0.0, level_s=[], top1=[], gap_s=None)
    assert abs(b.child_p(0) - 0.5) < 0.1 and abs(b.child_p(3) - 0.5) < 0.1


@pytest.mark.parametrize("kind", ["eagle1", "eagle3", "eagle3-lookup"])
def test_eagle_sampling_is_lossless(kind):
    """Dynamic EAGLE trees (and prompt-lookup grafts on them) under temperature + top-p keep the target's
    exact joint distribution."""
    from test_sampling_lossless import N_SEEDS, MIN_P

    target = build_model(llama_config(vocab=10, hidden=16, layers=1, initializer_range=0.5), seed=10)
    torch.manual_seed(4)
    three = kind.startswith("eagle3")
    cfg_h = HeadConfig.from_target(target.config, draft_vocab_size=8 if three else 0)
    head = Eagle3Head(cfg_h) if three else Eagle1Head(cfg_h)
    if three:
        head.set_vocab(torch.arange(2, 10))
    head.bind(target).eval()
    cfg = SamplingConfig(temperature=0.9, top_p=0.9)
    exact = exact_joint(target, PROMPT, cfg, 4)
    drafter = FeatureDrafter(head, kind, depth=2, topk=3, total_tokens=5)
    if kind.endswith("lookup"):
        drafter = LookupGraft(drafter, max_extra=4, min_ngram=1)  # 7 tokens in all: unigram matches, often
        grafted = []
        orig = drafter.start
        drafter.start = lambda *a: (grafted.extend(drafter.grafted), orig(*a))
    runs = N_SEEDS // 2
    counts, accepted = run_seeds(target, drafter, cfg, 4, range(runs))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0
    assert pvalue > MIN_P, pvalue
    hist = Counter(accepted)
    assert min(hist[0], hist[1]) > len(accepted) / 50, hist  # rejections and acceptances both exercised
    if kind.endswith("lookup"):
        assert sum(n > 0 for n in grafted) > runs / 20, Counter(grafted)  # grafts were verified often


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_guard_plain_steps_keep_the_head_in_sync(trained, name):
    """The guard's plain stretches change nothing in the output, and the head, which observes them, drafts
    as well after each stretch as without the guard (its cache and features stay in sync)."""
    from featspec.drafters.guard import Guard

    model, _, h3, _, prompts = trained[name]
    committed, drafted, plain = 0, 0, 0
    for prompt in prompts:
        # a plain step priced at 0 s makes every probe fail: 2 drafted steps, then 3 plain, and again
        guard = Guard(window=2, backoff=3, max_backoff=3, plain_prior_s=0.0, warmup=0)
        res = SpeculativeGenerator(TargetModel(model), FeatureDrafter(h3, "eagle3"), EOS, guard=guard).generate(prompt, 40)
        assert res.new_ids == hf_greedy(model, prompt, 40)
        plain += res.plain_steps
        committed += sum(s.committed for s in res.drafted_steps)
        drafted += len(res.drafted_steps)
        assert all(s.tree_size == 1 for s in res.steps if s.plain)
        assert guard.stats()["plain_steps"].get("measured", 0) == res.plain_steps
    assert plain > 0
    assert committed / drafted > 1.8, (committed, drafted)
