"""Losslessness under sampling: speculative sampling draws from exactly the target's distribution.

End to end: on a tiny small-vocabulary model the exact joint distribution of the first generated
tokens is computed by enumeration (process_logits over the target's logits), then SpeculativeGenerator
is run with 4,000 seeds and the empirical joint histogram is compared with a chi-square test. Negative
controls show the test has the power to catch wrong acceptance rules. Plus direct unit tests of
verify_sampling on synthetic p/q, and of process_logits against transformers' own warpers.

Why 3-4 new tokens and not 2: the engine samples the first token from the prefill and caps each
draft at max_new_tokens - generated - 1, so with max_new_tokens=2 every tree is cut to its root and
nothing speculative would be tested. With 3 tokens the first verify step drafts depth 1, with 4 depth 2.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import featspec.engine
from featspec.drafters import ModelDrafter
from featspec.protocol import DraftContext, Drafter
from featspec.engine import SpeculativeGenerator
from featspec.errors import FeatspecError
from featspec.models.target import TargetModel, VerifyOutput
from featspec.sampling import SamplingConfig, process_logits, sample, select_token
from featspec.tree import DraftTree
from featspec.verify import verify_sampling

from conftest import build_model, llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

V = 10
PROMPT = [1, 5, 3]
N_SEEDS = 4_000  # the negative controls below fail at p < 1e-6 with 1,000
MIN_P = 1e-3


@pytest.fixture(scope="module")
def small_target():
    return build_model(llama_config(vocab=V, hidden=16, layers=1, initializer_range=0.5), seed=10)


@pytest.fixture(scope="module")
def small_draft(small_target):
    """The target with a noisy LM head: a draft whose q overlaps p only partly."""
    draft = copy.deepcopy(small_target)
    g = torch.Generator().manual_seed(11)
    draft.lm_head.weight.add_(0.3 * torch.randn(draft.lm_head.weight.shape, generator=g))
    return draft


# ---------------------------------------------------------------- helpers


@torch.inference_mode()
def exact_joint(model, prompt: list[int], cfg: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """P(first n generated tokens) under plain sampling, by enumerating every supported prefix."""
    out: dict[tuple[int, ...], float] = {}

    def rec(prefix: list[int], prob: float) -> None:
        if len(prefix) == n:
            out[tuple(prefix)] = prob
            return
        p = process_logits(model(input_ids=torch.tensor([prompt + prefix])).logits[0, -1], cfg).double()
        p = p / p.sum()
        for t in p.nonzero().flatten().tolist():
            rec(prefix + [t], prob * float(p[t]))

    rec([], 1.0)
    assert math.isclose(sum(out.values()), 1.0, rel_tol=1e-9)
    return out


def chi2(counts: Counter, exact: dict, min_expected: float = 5.0) -> tuple[float, int]:
    """(p-value, samples that fell outside the exact support); cells with expected < 5 are merged."""
    n = sum(counts.values())
    outside = sum(c for k, c in counts.items() if exact.get(k, 0.0) == 0.0)
    obs, exp = [], []
    rest_o, rest_e = 0, 0.0
    for k, pk in sorted(exact.items(), key=lambda kv: -kv[1]):
        if pk * n >= min_expected:
            obs.append(counts.get(k, 0))
            exp.append(pk * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += pk * n
    if rest_e > 0:
        if rest_e >= min_expected or not obs:
            obs.append(rest_o)
            exp.append(rest_e)
        else:  # fold a too-small remainder into the smallest kept cell
            obs[-1] += rest_o
            exp[-1] += rest_e
    obs_t = torch.tensor(obs, dtype=torch.float64)
    if obs_t.sum() == 0:  # every sample fell outside the support
        return 0.0, outside
    exp_t = torch.tensor(exp, dtype=torch.float64)
    exp_t = exp_t * obs_t.sum() / exp_t.sum()  # outside-support samples are reported separately
    if len(obs) < 2:
        return 1.0, outside
    return float(chisquare(obs_t.numpy(), exp_t.numpy()).pvalue), outside


def run_seeds(target_model, drafter, cfg: SamplingConfig, n_new: int, seeds: range) -> tuple[Counter, list]:
    gen = SpeculativeGenerator(TargetModel(target_model), drafter, eos_ids=[])
    counts: Counter = Counter()
    accepted = []
    for seed in seeds:
        res = gen.generate(PROMPT, n_new, cfg, seed=seed)
        assert len(res.new_ids) == n_new
        counts[tuple(res.new_ids)] += 1
        accepted += [s.accepted for s in res.steps]
    return counts, accepted


class PointMassTreeDrafter(Drafter):
    """Deterministic multi-branch trees (q = None everywhere), built from the target's own ranking.

    With r1, r2, r3 the target's 3 most likely next tokens and o a token outside the top-k support,
    the root's children are r2, o, r1, r2 again (a duplicate: must never be accepted once r2 was
    rejected); r2 gets children r1', r3' and r1 gets r2' (ranks one level down). So rejection, the
    point-mass residual rule, and acceptance at depth 1 and 2 all happen. Rankings are memoised, so
    this costs almost nothing per step.
    """

    name = "pointmass-tree"
    wants_hidden = False

    def __init__(self, model):
        self.model = model
        self.memo: dict[tuple[int, ...], list[int]] = {}
        self.trees: list[DraftTree] = []

    @torch.inference_mode()
    def ranks(self, ctx: list[int]) -> list[int]:
        key = tuple(ctx)
        if key not in self.memo:
            self.memo[key] = self.model(input_ids=torch.tensor([ctx])).logits[0, -1].argsort(descending=True).tolist()
        return self.memo[key]

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        r = self.ranks(ctx.tokens)
        under_r2 = self.ranks(ctx.tokens + [r[1]])
        under_r1 = self.ranks(ctx.tokens + [r[0]])
        tree = DraftTree(
            [ctx.tokens[-1], r[1], r[-1], r[0], r[1], under_r2[0], under_r2[2], under_r1[1]],
            [-1, 0, 0, 0, 0, 1, 1, 3],
        )
        self.trees.append(tree)
        return tree



class IidSiblingsDrafter(Drafter):
    """Root children are k independent draws from one fixed q (with replacement), each recording q."""

    name = "iid-siblings"
    wants_hidden = False

    def __init__(self, q: torch.Tensor, k: int):
        self.q, self.k = q, k

    def start(self, prompt_ids: list[int], prefill: VerifyOutput) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        toks = [sample(self.q, ctx.generator) for _ in range(self.k)]
        return DraftTree([ctx.tokens[-1]] + toks, [-1] + [0] * self.k, [None] + [self.q] * self.k)



# ---------------------------------------------------------------- end to end


def test_chain_draft_model_top_p_is_lossless(small_target, small_draft):
    """(a) ModelDrafter samples from its own q (temperature + top-p); verify applies min(1, p/q)."""
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    exact = exact_joint(small_target, PROMPT, cfg, 3)
    draft_exact = exact_joint(small_draft, PROMPT, cfg, 1)
    target_first = {k[:1] for k in exact}
    assert set(draft_exact) != target_first  # q and p really differ (different supports even)
    counts, accepted = run_seeds(small_target, ModelDrafter(small_draft, draft_length=4), cfg, 3, range(N_SEEDS))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0
    assert pvalue > MIN_P, pvalue
    # both acceptance and rejection happened a lot
    assert 0.1 < sum(accepted) / N_SEEDS < 0.9


def test_pointmass_tree_top_k_is_lossless(small_target):
    """(b) Deterministic multi-branch trees (point masses, q=None) with temperature + top-k, depth 2."""
    cfg = SamplingConfig(temperature=1.3, top_k=3)
    exact = exact_joint(small_target, PROMPT, cfg, 4)
    assert len(exact) == 3**4
    drafter = PointMassTreeDrafter(small_target)
    counts, accepted = run_seeds(small_target, drafter, cfg, 4, range(N_SEEDS))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0
    assert pvalue > MIN_P, pvalue
    hist = Counter(accepted)
    assert hist[0] > 500 and hist[1] > 500 and hist[2] > 100  # rejection, partial and full acceptance


def test_iid_sibling_drafts_are_lossless(small_target):
    """(c) Several independent draws from one q as siblings: recursive rejection over (p - q)+."""
    cfg = SamplingConfig(temperature=1.0)
    exact = exact_joint(small_target, PROMPT, cfg, 3)
    q = torch.softmax(torch.linspace(2.0, -2.0, V), -1)  # far from p
    counts, accepted = run_seeds(small_target, IidSiblingsDrafter(q, 3), cfg, 3, range(N_SEEDS // 2))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0
    assert pvalue > MIN_P, pvalue
    assert 0.1 < sum(accepted) / len(accepted) < 0.95  # both outcomes are exercised


# ---------------------------------------------------------------- negative controls (the test has power)


def accept_everything(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[list[int], int]:
    node, path = 0, [0]
    while tree.children[node]:
        node = tree.children[node][0]
        path.append(node)
    return path, int(torch.multinomial(probs[node], 1, generator=generator).item())


def no_residual(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[list[int], int]:
    """The classic bug: after a rejection keep sampling from p instead of the residual."""
    node, path = 0, [0]
    while True:
        p = probs[node]
        accepted = None
        for child in tree.children[node]:
            x = tree.tokens[child]
            if float(torch.rand((), generator=generator)) < float(p[x]):
                accepted = child
                break
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator).item())
        node = accepted
        path.append(node)


def test_negative_control_accept_everything(small_target, small_draft, monkeypatch):
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    exact = exact_joint(small_target, PROMPT, cfg, 3)
    monkeypatch.setattr(featspec.engine, "verify_sampling", accept_everything)
    counts, _ = run_seeds(small_target, ModelDrafter(small_draft, draft_length=4), cfg, 3, range(1000))
    pvalue, outside = chi2(counts, exact)
    assert outside > 0 or pvalue < 1e-6


def test_negative_control_missing_residual(small_target, monkeypatch):
    cfg = SamplingConfig(temperature=1.3, top_k=3)
    exact = exact_joint(small_target, PROMPT, cfg, 4)
    monkeypatch.setattr(featspec.engine, "verify_sampling", no_residual)
    counts, _ = run_seeds(small_target, PointMassTreeDrafter(small_target), cfg, 4, range(1000))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0  # the bug stays inside the support: only the chi-square can see it
    assert pvalue < 1e-6, pvalue


# ---------------------------------------------------------------- verify_sampling on synthetic p / q


def _dist(g: torch.Generator, zeros: list[int] = ()) -> torch.Tensor:
    w = torch.rand(6, generator=g) + 0.05
    w[list(zeros)] = 0.0
    return w / w.sum()


def _first_token(tree: DraftTree, path: list[int], bonus: int) -> int:
    return tree.tokens[path[1]] if len(path) > 1 else bonus


def _pvalue_1d(counts: Counter, p: torch.Tensor) -> tuple[float, int]:
    return chi2(Counter({(k,): c for k, c in counts.items()}), {(i,): float(p[i]) for i in range(len(p))})


N_UNIT = 20_000


@pytest.mark.parametrize("k", [1, 3])
def test_verify_sampling_q_children(k):
    g = torch.Generator().manual_seed(1)
    p = _dist(g, zeros=[5])
    q = _dist(g, zeros=[0])
    counts, accepted = Counter(), 0
    for _ in range(N_UNIT):
        toks = torch.multinomial(q, k, replacement=True, generator=g).tolist()
        tree = DraftTree([9] + toks, [-1] + [0] * k, [None] + [q] * k)
        path, bonus = verify_sampling(tree, p[None].expand(k + 1, -1), g)
        assert len(path) <= 2 and path[0] == 0
        counts[_first_token(tree, path, bonus)] += 1
        accepted += len(path) > 1
    pvalue, outside = _pvalue_1d(counts, p)
    assert outside == 0 and pvalue > MIN_P, pvalue
    if k == 1:  # optimal acceptance rate of a single draft: sum_x min(p, q)
        rate = float(torch.minimum(p, q).sum())
        sd = math.sqrt(rate * (1 - rate) / N_UNIT)
        assert abs(accepted / N_UNIT - rate) < 5 * sd


def test_verify_sampling_point_mass_residual_rule():
    """Point-mass children: accept x w.p. p(x); on rejection zero p(x) and renormalise."""
    g = torch.Generator().manual_seed(2)
    p = _dist(g, zeros=[4])
    # 2 is tried twice (the duplicate must never be accepted), 4 has p = 0
    tree = DraftTree([9, 2, 4, 2, 0], [-1, 0, 0, 0, 0])
    probs = p[None].expand(len(tree), -1)
    counts, which = Counter(), Counter()
    for _ in range(N_UNIT):
        path, bonus = verify_sampling(tree, probs, g)
        counts[_first_token(tree, path, bonus)] += 1
        which[path[1] if len(path) > 1 else -1] += 1
    assert which[2] == 0 and which[3] == 0  # p(4) = 0 and the duplicate 2 have zero acceptance
    pvalue, outside = _pvalue_1d(counts, p)
    assert outside == 0 and pvalue > MIN_P, pvalue
    # node 1 (token 2) is accepted w.p. p(2) exactly
    sd = math.sqrt(float(p[2]) * (1 - float(p[2])) / N_UNIT)
    assert abs(which[1] / N_UNIT - float(p[2])) < 5 * sd
    # node 4 (token 0) is reached only after 2 was rejected: accepted w.p. p(0) / (1 - p(2))
    expected4 = (1 - float(p[2])) * (float(p[0]) / (1 - float(p[2])))  # = p(0)
    sd = math.sqrt(expected4 * (1 - expected4) / N_UNIT)
    assert abs(which[4] / N_UNIT - expected4) < 5 * sd


def test_verify_sampling_mixed_point_mass_then_q():
    g = torch.Generator().manual_seed(3)
    p = _dist(g)
    q = _dist(g, zeros=[1, 2])
    counts = Counter()
    for _ in range(N_UNIT):
        toks = torch.multinomial(q, 2, replacement=True, generator=g).tolist()
        tree = DraftTree([9, 1] + toks, [-1, 0, 0, 0], [None, None, q, q])
        path, bonus = verify_sampling(tree, p[None].expand(4, -1), g)
        counts[_first_token(tree, path, bonus)] += 1
    pvalue, outside = _pvalue_1d(counts, p)
    assert outside == 0 and pvalue > MIN_P, pvalue


def test_verify_sampling_depth_two_chain_joint():
    """A q-chain of depth 2: the first two tokens must follow p1(x) * p2(y | x)."""
    g = torch.Generator().manual_seed(4)
    p1, q1 = _dist(g), _dist(g, zeros=[3])
    p2 = torch.stack([_dist(g, zeros=[i]) for i in range(6)])  # p2[x] = p(. | x)
    q2 = torch.stack([_dist(g) for _ in range(6)])
    exact = {(x, y): float(p1[x] * p2[x, y]) for x in range(6) for y in range(6)}
    counts, depth = Counter(), Counter()
    for _ in range(N_UNIT):
        x = int(torch.multinomial(q1, 1, generator=g))
        y = int(torch.multinomial(q2[x], 1, generator=g))
        tree = DraftTree.chain(9, [x, y], [q1, q2[x]])
        probs = torch.stack([p1, p2[x], p2[0]])  # the row after y is never needed for 2 tokens
        path, bonus = verify_sampling(tree, probs, g)
        out = [tree.tokens[i] for i in path[1:]] + [bonus]
        if len(out) < 2:  # x rejected: the second token comes from the next step's plain sampling
            out.append(int(torch.multinomial(p2[out[0]], 1, generator=g)))
        counts[tuple(out[:2])] += 1
        depth[len(path) - 1] += 1
    assert min(depth[0], depth[1], depth[2]) > 500
    pvalue, outside = chi2(counts, exact)
    assert outside == 0 and pvalue > MIN_P, pvalue


def test_verify_sampling_degenerate_cases():
    g = torch.Generator().manual_seed(5)
    onehot = torch.zeros(6)
    onehot[3] = 1.0
    # the target is certain: a matching point mass is always accepted, others never
    tree = DraftTree([9, 1, 3, 5], [-1, 0, 0, 2])
    for _ in range(200):
        path, bonus = verify_sampling(tree, torch.stack([onehot, onehot, onehot, onehot]), g)
        assert path == [0, 2] and bonus == 3
    # q equal to p: always accepted
    p = _dist(g)
    for _ in range(200):
        x = int(torch.multinomial(p, 1, generator=g))
        path, _ = verify_sampling(DraftTree.chain(9, [x], [p]), torch.stack([p, p]), g)
        assert path == [0, 1]
    # root only: plain sampling from p
    path, bonus = verify_sampling(DraftTree.root(9), onehot[None], g)
    assert path == [0] and bonus == 3
    # a draft model with a smaller (unpadded) vocabulary than the target
    p = _dist(g)
    q_small = torch.tensor([0.0, 0.5, 0.5, 0.0])
    counts = Counter()
    for _ in range(N_UNIT // 2):
        x = int(torch.multinomial(q_small, 1, generator=g))
        tree = DraftTree.chain(9, [x], [q_small])
        path, bonus = verify_sampling(tree, torch.stack([p, p]), g)
        counts[_first_token(tree, path, bonus)] += 1
    pvalue, outside = _pvalue_1d(counts, p)
    assert outside == 0 and pvalue > MIN_P, pvalue


def test_verify_sampling_is_reproducible():
    p = _dist(torch.Generator().manual_seed(6))
    tree = DraftTree([9, 1, 2, 3, 4], [-1, 0, 0, 1, 1])
    probs = p[None].expand(5, -1)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append([verify_sampling(tree, probs, g) for _ in range(50)])
    assert runs[0] == runs[1]
    assert len(set(map(str, runs[0]))) > 3


# ---------------------------------------------------------------- process_logits vs transformers


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 5, 50, 64, 100])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 0.05])
def test_process_logits_matches_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(int(temperature * 10) + 1000 * top_k + int(top_p * 100))
    logits = torch.randn(16, 64, generator=g) * 3
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = process_logits(logits, cfg)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = scores.softmax(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(ours > 0, ref > 0)  # the same tokens survive
    kept = (ours > 0).sum(-1)
    if top_k:
        assert (kept <= top_k).all()
    if top_k == 1 or top_p == 0.05:
        assert (kept >= 1).all()


def test_process_logits_greedy_and_edges():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    greedy = process_logits(logits, SamplingConfig())
    assert greedy.dtype == torch.float32
    assert greedy.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    # top-p keeps the smallest prefix whose mass reaches top_p (the token crossing it included)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = process_logits(probs.log(), SamplingConfig(temperature=1.0, top_p=0.79))
    assert (out > 0).tolist() == [True, True, False, False]
    out = process_logits(probs.log(), SamplingConfig(temperature=1.0, top_p=0.81))
    assert (out > 0).tolist() == [True, True, True, False]
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    out = process_logits(probs.log(), SamplingConfig(temperature=1.0, top_p=0.01))
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    assert select_token(torch.tensor([0.0, 3.0, 1.0]), SamplingConfig(), g) == 1
    assert {select_token(torch.tensor([0.0, 0.0, -1e9]), SamplingConfig(temperature=1.0), g) for _ in range(50)} == {0, 1}


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_sampling_config_validation(kwargs):
    with pytest.raises(FeatspecError):
        SamplingConfig(**kwargs)
