"""Greedy exactness: speculative output == HF `generate(do_sample=False)`, and the target's KV cache
after every commit == the cache a fresh forward over the committed tokens builds.

Runs on tiny random LLaMA and Gemma-3 models (the Gemma one has an 8-token sliding window, so
prompts + generations cross it and TargetModel.tree_mask's per-layer-type masks are exercised).
A test-only oracle drafter knows the true greedy continuation and proposes random trees that mix
correct and wrong tokens, so deep acceptance, partial acceptance and rejection all occur.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from featspec.drafters import ModelDrafter, NgramDrafter, NoDraft
from featspec.protocol import DraftContext, Drafter, StepFeedback
from featspec.drafters.small_model import truncated_self_draft
from featspec.engine import SpeculativeGenerator
from featspec.models.tokens import eos_token_ids
from featspec.models.target import TargetModel, VerifyOutput
from featspec.tree import DraftTree

from conftest import GEMMA_WINDOW, TINY_VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ["llama", "gemma3"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def hf_greedy(model, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def fresh_cache(model, tokens: list[int]) -> DynamicCache:
    cache = DynamicCache()
    model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return cache


def assert_cache_matches(model, target: TargetModel, tokens: list[int]) -> None:
    """target's cache holds exactly the K/V a fresh forward over `tokens` builds."""
    assert target.length == len(tokens)
    ref = fresh_cache(model, tokens)
    layers = [l for l in target.cache.layers if getattr(l, "keys", None) is not None]
    ref_layers = [l for l in ref.layers if getattr(l, "keys", None) is not None]
    assert len(layers) == len(ref_layers) == model.config.num_hidden_layers
    for i, (a, b) in enumerate(zip(layers, ref_layers)):
        assert a.keys.shape == b.keys.shape, f"layer {i}: {tuple(a.keys.shape)} != {tuple(b.keys.shape)}"
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4, msg=f"keys of layer {i}")
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4, msg=f"values of layer {i}")


@torch.inference_mode()
def check_same_greedy(model, prompt: list[int], got: list[int], ref: list[int], in_hypothesis: bool) -> None:
    """Token equality; a divergence at an fp32 argmax near-tie (gap < 1e-4) is not a featspec bug."""
    if got == ref:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if k < min(len(got), len(ref)):
        logits = model(input_ids=torch.tensor([prompt + ref[:k]])).logits[0, -1]
        if abs(float(logits[ref[k]] - logits[got[k]])) < 1e-4 and in_hypothesis:
            reject()
    assert got == ref, f"diverges at new token {k}:\n got {got}\n ref {ref}"


class OracleDrafter(Drafter):
    """Proposes random trees around the known greedy continuation `truth` (prompt + reference)."""

    name = "oracle"
    wants_hidden = False

    def __init__(
        self, truth: list[int], vocab: int, seed: int, max_nodes: int, p_correct: float, chain_prob: float, steer=None
    ):
        self.truth, self.vocab = truth, vocab
        self.steer = truth if steer is None else steer  # what it proposes as "correct" tokens
        self.rng = random.Random(seed)
        self.max_nodes, self.p_correct, self.chain_prob = max_nodes, p_correct, chain_prob
        self.committed: list[int] = []
        self.history: list[tuple[DraftTree, list[int], int]] = []
        self.after_commit = None  # optional callback(committed tokens) run after each observe

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        assert prefill.logits.shape == (1, self.vocab)
        self.committed = list(prompt_ids)
        self.history = []

    def propose(self, ctx: DraftContext) -> DraftTree:
        # the engine hands over exactly prompt + everything committed so far (+ the first token)
        assert ctx.tokens[: len(self.committed)] == self.committed
        assert len(ctx.tokens) == len(self.committed) + (1 if not self.history else 0)
        assert ctx.max_depth >= 0
        rng, pos = self.rng, len(ctx.tokens)
        n = rng.randint(1, self.max_nodes)
        chain = rng.random() < self.chain_prob
        tokens, parents, on_truth = [ctx.tokens[-1]], [-1], [True]
        depths = [0]
        for i in range(1, n):
            if chain:
                parent = i - 1
            elif rng.random() < 0.5:  # extend the deepest node that is still on the true path
                parent = max((j for j in range(i) if on_truth[j]), key=lambda j: depths[j])
            else:
                parent = rng.randrange(i)
            d = depths[parent] + 1
            want = self.steer[pos + d - 1] if on_truth[parent] and pos + d - 1 < len(self.steer) else None
            tok = want if want is not None and rng.random() < self.p_correct else rng.randrange(self.vocab)
            tokens.append(tok)
            parents.append(parent)
            depths.append(d)
            on_truth.append(want is not None and tok == want)
        return DraftTree(tokens, parents)

    def observe(self, step: StepFeedback) -> None:
        tree, path, bonus, out = step.tree, step.path, step.bonus, step.out
        assert out.logits.shape == (len(tree), self.vocab)
        assert path[0] == 0 and all(tree.parents[b] == a for a, b in zip(path, path[1:]))
        if not self.history:
            self.committed.append(tree.tokens[0])  # the token sampled from the prefill
        self.check_longest_match(tree, path)
        self.committed += [tree.tokens[i] for i in path[1:]] + [bonus]
        self.history.append((tree, path, bonus))
        if self.after_commit is not None:
            self.after_commit(self.committed)


    def check_longest_match(self, tree: DraftTree, path: list[int]) -> None:
        """Greedy acceptance keeps the deepest node whose whole root path is the greedy continuation
        (when no two siblings share a token; with duplicates the first matching sibling wins)."""
        pos = len(self.committed)  # truth index of the token after the root
        if pos + tree.max_depth() > len(self.truth):
            return  # nodes past the known continuation (e.g. after an early EOS) cannot be judged
        match = [True] + [False] * (len(tree) - 1)
        for i in range(1, len(tree)):
            match[i] = match[tree.parents[i]] and tree.tokens[i] == self.truth[pos + tree.depths[i] - 1]
        best = max(d for d, m in zip(tree.depths, match) if m)
        unique = all(len({tree.tokens[c] for c in ch}) == len(ch) for ch in tree.children)
        if unique:
            assert len(path) - 1 == best, f"accepted {len(path) - 1} of a possible {best}"
        else:
            assert len(path) - 1 <= best
        assert match[path[-1]]


def check_stats(result, n_prompt: int) -> None:
    committed = sum(s.committed for s in result.steps)
    assert committed == len(result.new_ids) - 1
    assert result.verify_forwards == len(result.steps)
    if result.steps:
        assert result.tau == pytest.approx(committed / len(result.steps))
    else:
        assert result.tau is None and len(result.new_ids) == 1
    for s in result.steps:
        assert 0 <= s.accepted <= s.tree_size - 1
        assert 1 <= s.committed <= s.accepted + 1
        assert min(s.draft_s, s.verify_s, s.book_s) >= 0
    # only the step that hits a stop condition may drop accepted tokens
    assert all(s.committed == s.accepted + 1 for s in result.steps[:-1])
    assert len(result.prompt_ids) == n_prompt


prompts = st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=20)
repetitive_prompts = st.lists(st.integers(0, 5), min_size=1, max_size=20)


# ---------------------------------------------------------------- oracle trees vs HF generate


@pytest.mark.parametrize("name", MODELS)
@SETTINGS
@given(
    prompt=prompts,
    n_new=st.integers(1, 24),
    seed=st.integers(0, 2**31),
    max_nodes=st.integers(1, 14),
    p_correct=st.sampled_from([0.0, 0.5, 0.85, 1.0]),
    chain_prob=st.sampled_from([0.0, 0.3]),
    eos_mode=st.sampled_from(["config", "config", "from_output"]),
)
def test_oracle_trees_greedy_exact(tiny_models, name, prompt, n_new, seed, max_nodes, p_correct, chain_prob, eos_mode):
    model = tiny_models[name][0]
    eos = eos_token_ids(model, None)
    assert eos == [2]
    ref = hf_greedy(model, prompt, n_new, eos)
    if eos_mode == "from_output":
        # stop on a token the reference emits: generation must end right after its first occurrence,
        # usually in the middle of an accepted path
        eos = [ref[random.Random(seed).randrange(len(ref))]]
        ref = ref[: ref.index(eos[0]) + 1]
    drafter = OracleDrafter(prompt + ref, TINY_VOCAB, seed, max_nodes, p_correct, chain_prob)
    target = TargetModel(model)
    cache_checks = []

    def after_commit(committed):  # the cache must be exact after every single commit, not just at the end
        assert_cache_matches(model, target, committed[:-1])
        cache_checks.append(len(committed))

    drafter.after_commit = after_commit
    result = SpeculativeGenerator(target, drafter, eos).generate(prompt, n_new)
    check_same_greedy(model, prompt, result.new_ids, ref, in_hypothesis=True)
    assert result.stop_reason == ("eos" if result.new_ids[-1] in eos else "max_new_tokens")
    assert len(cache_checks) == len(result.steps)
    check_stats(result, len(prompt))
    if not result.steps:  # one new token, straight from the prefill
        assert len(ref) == 1 and target.length == len(prompt)
        return
    # committed tokens beyond a stop are still real greedy tokens, and the cache covers all but the last
    assert drafter.committed[: len(prompt) + len(ref)] == prompt + ref
    assert target.length == len(drafter.committed) - 1
    if result.stop_reason == "max_new_tokens":
        assert target.length == len(prompt) + len(ref) - 1


def test_oracle_exercises_all_outcomes(tiny_models):
    """Sanity for the harness: with mixed trees, steps with full, partial and zero acceptance all occur."""
    model = tiny_models["gemma3"][0]
    prompt = list(range(3, 15))
    ref = hf_greedy(model, prompt, 40, [2])
    assert len(prompt) + len(ref) > 3 * GEMMA_WINDOW
    drafter = OracleDrafter(prompt + ref, TINY_VOCAB, seed=1, max_nodes=10, p_correct=0.7, chain_prob=0.2)
    result = SpeculativeGenerator(TargetModel(model), drafter, [2]).generate(prompt, 40)
    assert result.new_ids == ref
    accepted = [s.accepted for s in result.steps]
    assert 0 in accepted and max(accepted) >= 3
    # accepted paths inside branching trees (not just chains) occur
    assert any(len(p) > 1 and not t.is_chain() for t, p, _ in drafter.history)


# ---------------------------------------------------------------- tree verification, node by node


@pytest.mark.parametrize("name", ["llama", "gemma3", "gemma3-eager"])
@settings(max_examples=20, deadline=None)
@given(
    prefix_len=st.integers(1, 3 * GEMMA_WINDOW),
    n_nodes=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_tree_logits_and_commit_match_sequential(tiny_models, name, prefix_len, n_nodes, seed):
    """verify(tree).logits[i] == logits after feeding prefix + path_to(i); commit(path) == fresh cache."""
    model = tiny_models[name][0]
    rng = random.Random(seed)
    prefix = [rng.randrange(TINY_VOCAB) for _ in range(prefix_len)]
    parents = [-1] + [rng.randrange(i) for i in range(1, n_nodes)]
    tree = DraftTree([prefix[-1]] + [rng.randrange(TINY_VOCAB) for _ in range(n_nodes - 1)], parents)
    target = TargetModel(model)
    if name.startswith("gemma3"):
        assert target.sliding_window == GEMMA_WINDOW
    target.prefill(prefix[:-1] or [prefix[0]])  # need at least one prompt token
    base = prefix[:-1] or [prefix[0]]
    out = target.verify(tree, hidden=True)
    assert out.logits.shape == (n_nodes, TINY_VOCAB)
    assert len(out.hidden) == model.config.num_hidden_layers + 1
    with torch.inference_mode():
        for i in range(n_nodes):
            seq = base + [tree.tokens[j] for j in tree.path_to(i)]
            ref = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
            torch.testing.assert_close(out.logits[i], ref.logits[0, -1], atol=1e-4, rtol=1e-4, msg=f"node {i}")
            torch.testing.assert_close(out.hidden[-1][i], ref.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)
    node = rng.randrange(n_nodes)
    path = tree.path_to(node)
    target.commit(path)
    assert_cache_matches(model, target, base + [tree.tokens[j] for j in path])


def test_sliding_window_mask_matters(tiny_models):
    """Negative control: scoring a tree past the window without the sliding mask gives wrong logits."""
    model = tiny_models["gemma3"][0]
    prefix = [(7 * i + 3) % TINY_VOCAB for i in range(3 * GEMMA_WINDOW)]
    tree = DraftTree([prefix[-1], 5, 6, 7, 8], [-1, 0, 0, 1, 3])
    with torch.inference_mode():
        ref = [model(input_ids=torch.tensor([prefix[:-1] + [tree.tokens[j] for j in tree.path_to(i)]])).logits[0, -1] for i in range(5)]
    ref = torch.stack(ref)
    for window, should_match in [(GEMMA_WINDOW, True), (None, False)]:
        target = TargetModel(model)
        target.sliding_window = window
        target.prefill(prefix[:-1])
        got = target.verify(tree).logits
        assert torch.allclose(got, ref, atol=1e-4) == should_match


def test_truncated_self_draft_leaves_target_intact(tiny_models):
    for name in MODELS:
        model = tiny_models[name][0]
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
        with torch.inference_mode():
            before = model(input_ids=ids).logits
            draft = truncated_self_draft(model, 1)
            assert len(draft.get_decoder().layers) == 1
            assert len(model.get_decoder().layers) == 2 and model.config.num_hidden_layers == 2
            dl = draft(input_ids=ids).logits
            after = model(input_ids=ids).logits
        torch.testing.assert_close(before, after, atol=0, rtol=0)
        assert not torch.allclose(dl, before, atol=1e-3)
        assert draft.get_decoder().embed_tokens.weight.data_ptr() == model.get_decoder().embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------- the real drafters


def real_drafters(model, draft_model, rng: random.Random):
    return [
        NoDraft(),
        NgramDrafter(),
        NgramDrafter(max_ngram=2, min_ngram=1, depth=rng.randint(1, 6), max_matches=rng.randint(1, 4), max_nodes=rng.randint(2, 12)),
        ModelDrafter(draft_model, draft_length=rng.randint(1, 6)),
        ModelDrafter(truncated_self_draft(model, 1), draft_length=rng.randint(1, 6)),
    ]


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(prompts, repetitive_prompts), n_new=st.integers(1, 28), seed=st.integers(0, 2**31))
def test_real_drafters_greedy_exact(tiny_models, name, prompt, n_new, seed):
    model, draft_model = tiny_models[name]
    eos = eos_token_ids(model, None)
    ref = hf_greedy(model, prompt, n_new, eos)
    for drafter in real_drafters(model, draft_model, random.Random(seed)):
        target = TargetModel(model)
        result = SpeculativeGenerator(target, drafter, eos).generate(prompt, n_new)
        check_same_greedy(model, prompt, result.new_ids, ref, in_hypothesis=True)
        check_stats(result, len(prompt))
        if result.stop_reason == "max_new_tokens":
            assert_cache_matches(model, target, prompt + ref[:-1])


@pytest.mark.parametrize("name", MODELS)
def test_real_drafters_accept_and_reuse(tiny_models, name):
    """Fixed prompts where drafts do get accepted, so the exactness above is not vacuous."""
    model, draft_model = tiny_models[name]
    prompt = [11, 12, 13, 14, 15, 11, 12, 13, 14]
    ref = hf_greedy(model, prompt, 40, [2])
    assert len(ref) == 40
    accepted = {}
    for drafter in real_drafters(model, draft_model, random.Random(0))[1:] + [ModelDrafter(model, draft_length=4)]:
        result = SpeculativeGenerator(TargetModel(model), drafter, [2]).generate(prompt, 40)
        assert result.new_ids == ref, drafter
        check_stats(result, len(prompt))
        accepted[id(drafter)] = sum(s.accepted for s in result.steps)
    # the target drafting for itself must be accepted every time: 4 drafts + 1 bonus per step
    last = result
    assert all(s.accepted == min(4, s.tree_size - 1) for s in last.steps)
    assert last.tau > 4
    assert sum(accepted.values()) > 40


# ---------------------------------------------------------------- tau / StepStats bookkeeping


class MaxRng(random.Random):
    """Makes OracleDrafter propose its largest tree, as a chain of correct tokens."""

    def randint(self, a, b):
        return b

    def random(self):
        return 0.0


@pytest.mark.parametrize("name", MODELS)
def test_stats_bookkeeping(tiny_models, name):
    model = tiny_models[name][0]
    prompt = [11, 12, 13, 14, 15]
    n = 30
    ref = hf_greedy(model, prompt, n, [2])
    assert len(ref) == n

    vanilla = SpeculativeGenerator(TargetModel(model), NoDraft(), [2]).generate(prompt, n)
    assert vanilla.new_ids == ref
    assert len(vanilla.steps) == n - 1 and vanilla.tau == 1.0
    assert all(s.tree_size == 1 and s.accepted == 0 and s.committed == 1 for s in vanilla.steps)

    # an always-correct chain of 3: every step commits 3 drafts + bonus, except where max_new_tokens cuts
    perfect = OracleDrafter(prompt + ref, TINY_VOCAB, seed=0, max_nodes=4, p_correct=1.0, chain_prob=1.0)
    perfect.rng = MaxRng()
    res = SpeculativeGenerator(TargetModel(model), perfect, [2]).generate(prompt, n)
    assert res.new_ids == ref
    check_stats(res, len(prompt))
    assert [s.committed for s in res.steps] == [4] * 7 + [1]  # 1 (prefill) + 7*4 + 1 = 30
    assert [s.tree_size for s in res.steps] == [4] * 7 + [1]  # the last tree was truncated to the root
    assert res.tau == pytest.approx(29 / 8)

    # an always-wrong drafter: nothing accepted, tau == 1
    shifted = prompt + [(t + 1) % TINY_VOCAB for t in ref]  # its "correct" tokens are all wrong
    wrong = OracleDrafter(prompt + ref, TINY_VOCAB, seed=0, max_nodes=6, p_correct=1.0, chain_prob=0.0, steer=shifted)
    res = SpeculativeGenerator(TargetModel(model), wrong, [2]).generate(prompt, n)
    assert res.new_ids == ref and res.tau == 1.0
    assert all(s.accepted == 0 for s in res.steps)

    # EOS inside an accepted path: the step's committed count stops at the EOS token
    eos_tok = ref[9]
    expected = ref[: ref.index(eos_tok) + 1]
    assert expected == hf_greedy(model, prompt, n, [eos_tok])
    perfect.rng = MaxRng()
    res = SpeculativeGenerator(TargetModel(model), perfect, [eos_tok]).generate(prompt, n)
    assert res.new_ids == expected and res.stop_reason == "eos"
    check_stats(res, len(prompt))


# ---------------------------------------------------------------- limits and argument errors


class RecordingTarget(TargetModel):
    """Records the largest position each verify forward scores."""

    def __init__(self, model):
        super().__init__(model)
        self.max_positions: list[int] = []

    def verify(self, tree, hidden: bool = False):
        self.max_positions.append(self.length + tree.max_depth())
        return super().verify(tree, hidden)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prompt_len", [240, 250, 255])
def test_context_length_stop(tiny_models, name, prompt_len):
    model = tiny_models[name][0]
    limit = model.config.max_position_embeddings
    prompt = [(5 * i + 3) % TINY_VOCAB for i in range(prompt_len)]
    prompt = [t if t != 2 else 3 for t in prompt]
    room = limit - prompt_len
    ref = hf_greedy(model, prompt, room, [2])
    drafter = OracleDrafter(prompt + ref, TINY_VOCAB, seed=0, max_nodes=12, p_correct=1.0, chain_prob=1.0)
    drafter.rng = MaxRng()  # always the longest possible correct chain: pushes against the limit
    target = RecordingTarget(model)
    result = SpeculativeGenerator(target, drafter, [2]).generate(prompt, 50)
    assert result.new_ids == ref
    if len(ref) == room:  # no EOS on the way
        assert result.stop_reason == "context_length"
        assert len(prompt) + len(result.new_ids) == limit
    assert all(p <= limit - 1 for p in target.max_positions)


def test_generate_argument_errors(tiny_models):
    from featspec.errors import FeatspecError

    model = tiny_models["llama"][0]
    gen = SpeculativeGenerator(TargetModel(model), NoDraft(), [2])
    with pytest.raises(FeatspecError):
        gen.generate([5, 6], 0)
    with pytest.raises(FeatspecError):
        gen.generate([], 4)
    with pytest.raises(FeatspecError):
        gen.generate([5] * model.config.max_position_embeddings, 4)
    with pytest.raises(RuntimeError):
        TargetModel(model).verify(DraftTree.root(3))
    # a prompt one short of the window still yields exactly one token
    res = gen.generate([5] * (model.config.max_position_embeddings - 1), 4)
    assert len(res.new_ids) == 1 and res.stop_reason in ("context_length", "eos") and not res.steps
