"""The block drafter: one head forward drafts every position; greedy exactness (LLaMA, Gemma-3), lossless
sampling (chi-square), the loss's masks (a slot never sees its own future), the tree's best-first shape, and the
head's save/load/export rules."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from featspec.drafters.block import BlockDrafter
from featspec.drafters.budget import Budget, CostCurve
from featspec.drafters.lookup import LookupGraft
from featspec.engine import SpeculativeGenerator
from featspec.errors import FeatspecError
from featspec.heads.block import BlockHead
from featspec.heads.checkpoint import export_head, load_head, save_head
from featspec.heads.layers import HeadConfig
from featspec.models.target import TargetModel
from featspec.sampling import SamplingConfig
from featspec.train.losses import block_loss, block_outputs, target_batch

from conftest import build_model, gemma3_config, llama_config
from test_eagle_drafters import EOS, hf_greedy, own_text
from test_sampling_lossless import MIN_P, N_SEEDS, PROMPT, chi2, exact_joint, run_seeds

pytestmark = pytest.mark.usefixtures("one_thread")


def make_head(model, k: int = 4, vocab: int = 64, seed: int = 0, chain: bool = True) -> BlockHead:
    torch.manual_seed(seed)
    head = BlockHead(HeadConfig.from_target(model.config, draft_vocab_size=vocab), block_size=k, chain=chain).bind(model)
    head.set_vocab(torch.arange(model.config.vocab_size)[-vocab:])
    torch.nn.init.normal_(head.mask_feat, std=0.1)
    torch.nn.init.normal_(head.mask_embed, std=0.5)
    return head


def fit(model, head: BlockHead, data: torch.Tensor, steps: int = 150) -> tuple[dict, dict]:
    """Memorise `data` (the target's own text): held-in stats before and after."""
    batch = {"input_ids": data, "attention_mask": torch.ones_like(data), "loss_mask": torch.ones_like(data)}
    tb = target_batch(model, head, batch)
    lm_head = model.get_output_embeddings()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    with torch.no_grad():
        before = block_loss(head, tb, lm_head, 8, torch.Generator().manual_seed(0))[1]
    for step in range(steps):
        loss, _ = block_loss(head, tb, lm_head, 8, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = block_loss(head, tb, lm_head, 8, torch.Generator().manual_seed(0))[1]
    return before, after


@pytest.fixture(scope="module")
def fitted():
    out = {}
    for name, model in (("llama", build_model(llama_config(layers=4), seed=0)), ("gemma3", build_model(gemma3_config(), seed=2))):
        text = own_text(model, 6, seed=0)
        head = make_head(model)
        before, after = fit(model, head, text)
        out[name] = (model, head.eval(), before, after, text[:, :6].tolist())
    return out


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_block_head_learns_every_position(fitted, name):
    _, _, before, after, _ = fitted[name]
    for i in range(4):
        assert after[f"acc_{i}"] > max(0.5, before[f"acc_{i}"] + 0.2), (i, before, after)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_block_drafter_greedy_exact_and_accepted(fitted, name):
    """fp32 greedy output is token-identical to HF generate, with random trees and budgets; on the text the
    head memorised, drafts are accepted beyond the first position."""
    model, head, _, _, prompts = fitted[name]
    rng = random.Random(0)
    curve = CostCurve([1, 8, 32, 64], [1.0, 1.1, 1.4, 2.0])
    accepted = Counter()
    for prompt in prompts[:3] + [[5, 9, 11, 3]]:
        ref = hf_greedy(model, prompt, 30)
        for drafter in (BlockDrafter(head, topk=rng.randint(1, 5), total_tokens=rng.randint(1, 24)),
                        BlockDrafter(head, topk=3, total_tokens=20, budget=Budget(curve)),
                        LookupGraft(BlockDrafter(head, topk=2, total_tokens=6), max_extra=4)):
            res = SpeculativeGenerator(TargetModel(model), drafter, EOS).generate(prompt, 30)
            assert res.new_ids == ref, (drafter.name, prompt)
            accepted.update(s.accepted for s in res.steps)
    assert sum(v for k, v in accepted.items() if k >= 2) > 0, accepted


def test_block_sampling_is_lossless():
    """Block trees under temperature + top-p keep the target's exact joint distribution (chi-square)."""
    target = build_model(llama_config(vocab=10, hidden=16, layers=1, initializer_range=0.5), seed=10)
    head = make_head(target, k=3, vocab=8, seed=4).eval()
    cfg = SamplingConfig(temperature=0.9, top_p=0.9)
    exact = exact_joint(target, PROMPT, cfg, 4)
    counts, accepted = run_seeds(target, BlockDrafter(head, topk=3, total_tokens=6), cfg, 4, range(N_SEEDS // 2))
    pvalue, outside = chi2(counts, exact)
    assert outside == 0 and pvalue > MIN_P, pvalue
    hist = Counter(accepted)
    assert min(hist[0], hist[1]) > len(accepted) / 50, hist  # rejections and acceptances both exercised


@pytest.mark.parametrize("chain", [True, False])
def test_training_forward_is_the_drafting_forward(chain):
    """What the loss scores is what drafting computes: for anchors a, the loss's slot outputs and entry a's output
    equal a drafting forward after entries 0..a (the slots see nothing past a, nor another block's slots)."""
    model = build_model(llama_config(layers=2), seed=0)
    head = make_head(model, k=4, chain=chain).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    tb = target_batch(model, head, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
    anchors = torch.tensor([[3, 9, 15]])
    with torch.no_grad():
        feats = head.fuse(tb.hidden)
        toks = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # entry t pairs feature t with token t+1
        out = block_outputs(head, feats, head.embed(toks), anchors)
        for j, a in enumerate(anchors[0].tolist()):
            cache = head.new_cache()
            drafted, first_logits = head.draft(feats[0, : a + 1], toks[0, : a + 1], 0, cache, 4)
            assert cache.length == a + 1  # the slots left the cache
            assert (first_logits is not None) == chain
            if chain:  # the logits drafting reuses are position 0's
                torch.testing.assert_close(first_logits, head.logits(drafted[:1]))
            trained = torch.cat([out[0, a: a + 1], out[0, 20 + 3 * j: 20 + 3 * (j + 1)]])
            torch.testing.assert_close(trained, drafted, rtol=1e-4, atol=1e-5)


def test_tree_is_best_first_and_prefix_closed():
    model = build_model(llama_config(layers=1), seed=0)
    d = BlockDrafter(make_head(model, k=3), topk=2, total_tokens=5)
    lps = [[-0.1, -2.0], [-0.5, -0.7], [-0.2, -3.0]]
    ids = [[10, 11], [20, 21], [30, 31]]
    tree = d._tree(1, ids, lps)
    # best paths by summed log-prob: 10 (-0.1), 10-20 (-0.6), 10-21 (-0.8), 10-20-30 (-0.8), 10-21-30 (-1.0)
    assert tree.tokens == [1, 10, 20, 21, 30, 30]
    assert tree.parents == [-1, 0, 1, 1, 2, 3]


def test_chained_tree_grows_under_the_top_first_token_only():
    """A chained head's later positions assume position 0's top token: a second-ranked first token stays a leaf
    however well it scores; an unchained head extends it."""
    model = build_model(llama_config(layers=1), seed=0)
    lps = [[-0.1, -0.2], [-0.3, -0.4]]
    ids = [[10, 11], [20, 21]]
    chained = BlockDrafter(make_head(model, k=2), topk=2, total_tokens=6)._tree(1, ids, lps)
    assert chained.tokens == [1, 10, 11, 20, 21] and chained.parents == [-1, 0, 0, 1, 1]
    free = BlockDrafter(make_head(model, k=2, chain=False), topk=2, total_tokens=6)._tree(1, ids, lps)
    assert free.tokens == [1, 10, 11, 20, 20, 21, 21] and free.parents == [-1, 0, 0, 1, 2, 1, 2]


@pytest.mark.parametrize("chain", [True, False])
def test_block_head_saves_loads_and_refuses_export(tmp_path, chain):
    model = build_model(llama_config(layers=4), seed=0)
    head = make_head(model, k=5, chain=chain)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    back = load_head(tmp_path / "h")
    assert isinstance(back, BlockHead) and back.block_size == 5 and back.chain == chain
    for (k, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FeatspecError, match="no serving engine loads"):
        export_head(str(tmp_path / "h"), "vllm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_block_head_with_a_bad_chain_flag_is_refused(tmp_path):
    model = build_model(llama_config(layers=4), seed=0)
    save_head(make_head(model, k=3), tmp_path / "h", dtype=torch.float32)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["featspec"]["chain"] = "yes"
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FeatspecError, match="featspec.chain must be true or false"):
        load_head(tmp_path / "h")
