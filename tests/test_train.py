"""The trainer end to end on a tiny random target that uses SmolLM2's tokenizer and chat template:
exact resume (same loss curve and weights as an uninterrupted run), atomic checkpoints, the saved head
loads back, and bad invocations fail with one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from featspec.errors import FeatspecError
from featspec.heads.checkpoint import load_head
from featspec.models.registry import resolve_source
from featspec.data.sharegpt import sharegpt_messages
from featspec.train.data import render
from featspec.train.trainer import TrainConfig, train

from conftest import build_model, llama_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    model = build_model(llama_config(vocab=len(tok), hidden=32, layers=6, initializer_range=0.02), seed=0)
    model.config.max_position_embeddings = 512
    out = tmp_path_factory.mktemp("tiny-target")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def config(target_dir, out, **kw) -> TrainConfig:
    base = dict(method="eagle3", target=str(target_dir), max_conversations=6, max_length=64, out=str(out), batch_size=1,
                grad_accum=2, warmup_steps=1, ttt_steps=2, draft_vocab=512, dtype="float32", save_every=1,
                eval_every=2, eval_conversations=2, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_render_masks_assistant_tokens(tiny_target_dir):
    _, tok = tiny_target_dir
    msgs = sharegpt_messages({"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello friend"},
                                                  {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you"}]})
    ids, mask = render(tok, msgs, 512)
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Hello friend" in marked and "See you" in marked
    assert "Hi there" not in marked and "Bye" not in marked and "system" not in marked


@pytest.mark.parametrize("method", ["eagle3", "eagle1", "block"])
def test_resume_reproduces_the_uninterrupted_run(tiny_target_dir, tmp_path, method):
    target_dir, _ = tiny_target_dir
    full = train(config(target_dir, tmp_path / "full", method=method))
    train(config(target_dir, tmp_path / "cut", method=method, max_steps=2))
    meta = json.loads((tmp_path / "cut" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2
    resumed = train(config(target_dir, tmp_path / "cut", method=method, max_steps=0), resume=True)
    log_full = json.loads((tmp_path / "full" / "train_log.json").read_text())["log"]
    log_cut = json.loads((tmp_path / "cut" / "train_log.json").read_text())["log"]
    assert len(log_full) == len(log_cut) == 3  # 6 conversations / (1 x 2) = 3 optimizer steps
    for a, b in zip(log_full, log_cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
    ha, hb = load_head(full), load_head(resumed)
    assert ha.kind == method
    for k, v in ha.state_dict().items():
        torch.testing.assert_close(v, hb.state_dict()[k], rtol=0, atol=0)
    assert not list(tmp_path.glob("*/checkpoint.tmp")) and not list(tmp_path.glob("*/checkpoint.old"))
    card = (tmp_path / "full" / "head" / "README.md").read_text()
    assert "Command" in card and "tokens seen" in card


def test_trainer_refuses_bad_invocations(tiny_target_dir, tmp_path):
    target_dir, _ = tiny_target_dir
    with pytest.raises(FeatspecError, match="no checkpoint"):
        train(config(target_dir, tmp_path / "none"), resume=True)
    train(config(target_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(FeatspecError, match="--resume"):
        train(config(target_dir, tmp_path / "run"))
    with pytest.raises(FeatspecError, match="eagle1, eagle3 or block"):
        train(config(target_dir, tmp_path / "x", method="medusa"))


def test_regenerate_answers_with_the_target_and_caches(tiny_target_dir, tmp_path, monkeypatch):
    """--regenerate trains on the target's own greedy answers; a second run reads them from the cache."""
    from featspec.models.registry import load_model
    from featspec.models.tokens import encode_messages
    from featspec.train.data import load_regenerated

    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path / "cache"))
    target_dir, tok = tiny_target_dir
    lm = load_model(str(target_dir), "float32")
    examples = load_regenerated(lm, 3, 256, seed=0, max_new_tokens=12)
    assert len(examples) == 3
    files = list((tmp_path / "cache" / "regenerated").glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    for row in rows:
        user, answer = row["messages"]
        ids = encode_messages(tok, [user])
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert answer["content"] == tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    monkeypatch.setattr(lm.model, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    again = load_regenerated(lm, 3, 256, seed=0, max_new_tokens=12)
    assert [e.ids for e in again] == [e.ids for e in examples]
    later = load_regenerated(lm, 2, 256, seed=0, max_new_tokens=12, skip=1)  # --skip-conversations 1: cached rows 2-3
    assert [e.source for e in later] == [e.source for e in examples[1:]]


def test_shipped_regenerated_answers_count_as_cached(tmp_path, monkeypatch):
    """Answers shipped in featspec/assets/regenerated (gzip'd JSONL) are used without generating; a row in
    the local cache overrides the shipped one; a line cut by a kill is skipped."""
    import gzip

    from featspec.train import regenerate as regen

    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(regen, "SHIPPED", tmp_path / "assets")
    (tmp_path / "assets").mkdir()
    row = lambda cid, text: json.dumps({"id": cid, "messages": [{"role": "user", "content": cid},
                                                                {"role": "assistant", "content": text}]})
    regen.shipped_path("org/tgt", 12).write_bytes(gzip.compress("\n".join([row("a", "shipped a"), row("b", "shipped b"),
                                                                             '{"id": "c", "mess']).encode()))
    local = regen.regenerated_path("org/tgt", 12)
    local.parent.mkdir(parents=True)
    local.write_text(row("b", "local b") + "\n")

    class NoGenerate:
        spec, tokenizer = "org/tgt", None
        model = property(lambda self: (_ for _ in ()).throw(AssertionError("generated")))

    out = regen.regenerate(NoGenerate(), [("a", "a"), ("b", "b")], max_new_tokens=12)
    assert [(cid, m[1]["content"]) for cid, m in out] == [("a", "shipped a"), ("b", "local b")]
    assert set(regen._done(local, regen.shipped_path("org/tgt", 12))) == {"a", "b"}


def test_feature_cache_trains_like_online_features_and_is_keyed(tiny_target_dir, tmp_path, capsys):
    """--cache-features: the same losses as features computed online (padding included), the target runs
    once per example, and a cache made for other data is refused."""
    target_dir, _ = tiny_target_dir
    cache = tmp_path / "feats"
    train(config(target_dir, tmp_path / "online", batch_size=2, grad_accum=1))
    train(config(target_dir, tmp_path / "cached", batch_size=2, grad_accum=1, cache_features=str(cache)))
    assert "GB on disk" in capsys.readouterr().out
    online = json.loads((tmp_path / "online" / "train_log.json").read_text())["log"]
    cached = json.loads((tmp_path / "cached" / "train_log.json").read_text())["log"]
    assert len(online) == len(cached) == 3
    for a, b in zip(online, cached):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 6 and not list(cache.glob("*.tmp"))
    stamps = [f.stat().st_mtime_ns for f in files]
    train(config(target_dir, tmp_path / "again", batch_size=2, grad_accum=1, cache_features=str(cache)))
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == stamps  # read, not recomputed
    with pytest.raises(FeatspecError, match="other data"):
        train(config(target_dir, tmp_path / "other", max_conversations=5, cache_features=str(cache)))


def test_feature_scale_fold_is_the_same_function():
    """Training reads x / scale; the folded weight reads x: the fc output is identical, and unfold inverts fold."""
    from featspec.train.precondition import feature_scale, fold, unfold

    torch.manual_seed(0)
    rows = [[torch.randn(9, 4) * torch.tensor([1.0, 50.0, 0.1, 3.0]), torch.randn(9, 4)] for _ in range(5)]
    rows[0][0][0] = 1e4  # an attention-sink position 0: left out of the statistics
    scale = feature_scale(rows)
    assert scale.shape == (8,)
    assert scale[1] == pytest.approx(50.0, rel=0.25) and scale[2] == pytest.approx(0.1, rel=0.25)
    w = torch.randn(3, 8)
    x = torch.cat(rows[1], -1)
    torch.testing.assert_close((x / scale) @ w.T, x @ fold(w, scale).T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(unfold(fold(w, scale), scale), w)


def test_preconditioned_run_saves_a_head_that_reads_raw_features(tiny_target_dir, tmp_path):
    """The saved head (fc folded) gives the training-time loss on raw features; the checkpoint keeps the scale."""
    from featspec.models.registry import load_model
    from featspec.train.data import collate, load_sharegpt
    from featspec.train.losses import eagle3_loss, target_batch
    from featspec.train.precondition import scaled

    target_dir, tok = tiny_target_dir
    cfg = config(target_dir, tmp_path / "run", max_steps=2)
    train(cfg)
    blob = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    scale = blob["feature_scale"]
    assert scale is not None and not torch.allclose(scale, torch.ones_like(scale))
    lm = load_model(str(target_dir), "float32")
    saved = load_head(tmp_path / "run" / "head").bind(lm.model)
    trained = load_head(tmp_path / "run" / "head").bind(lm.model)
    trained.load_state_dict(blob["head"])
    ex = load_sharegpt(tok, 1, 64, seed=0, heldout=True)
    batch = collate(ex, 0)
    tb = target_batch(lm.model, saved, batch)
    raw, _ = eagle3_loss(saved, tb, 2, lm.model.get_output_embeddings())
    pre, _ = eagle3_loss(trained, scaled(tb, scale), 2, lm.model.get_output_embeddings())
    assert float(raw) == pytest.approx(float(pre), rel=1e-4)
    assert not torch.allclose(saved.fc.weight, trained.fc.weight)


def test_init_from_run_first_evaluates_the_head_it_starts_from(tiny_target_dir, tmp_path):
    """A continued run logs the starting head's held-out evaluation at step 0: the finished head, reloaded
    (fc folded and unfolded again), scores what it scored at the end of its own run, and unlike a fresh head."""
    target_dir, _ = tiny_target_dir
    first = train(config(target_dir, tmp_path / "first", lr=3e-2))  # a high lr: the head moves far from its start
    end = json.loads((tmp_path / "first" / "train_log.json").read_text())["evals"][-1]
    train(config(target_dir, tmp_path / "next", max_steps=1, init_from=str(first)))
    evals = json.loads((tmp_path / "next" / "train_log.json").read_text())["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 1
    assert set(end) == {"step", "acc_0", "acc_1", "loss_0", "loss_1"}
    for k in ("acc_0", "acc_1", "loss_0", "loss_1"):
        assert evals[0][k] == pytest.approx(end[k], abs=1e-5)
    # the tiny target is near-uniform, so losses differ little between heads; another head still differs by far more
    train(config(target_dir, tmp_path / "fresh", max_steps=1, eval_every=1))
    fresh = json.loads((tmp_path / "fresh" / "train_log.json").read_text())["evals"][0]
    assert fresh["step"] == 1 and abs(fresh["loss_0"] - end["loss_0"]) > 1e-3


def test_init_from_a_smaller_draft_vocab_widens_it(tiny_target_dir, tmp_path):
    """--init-from a head with a smaller --draft-vocab: the new vocabulary holds every old draft id, the old
    head's weights carry over (lr 0 leaves the start as it is); without --draft-vocab the head keeps its own
    size; narrowing is refused in one line."""
    target_dir, _ = tiny_target_dir
    first = train(config(target_dir, tmp_path / "first", max_steps=2))
    wide = train(config(target_dir, tmp_path / "wide", max_steps=1, lr=0.0, draft_vocab=1024, init_from=str(first)))
    old, new = load_head(first), load_head(wide)
    assert new.d2t.numel() == 1024 and bool(new.t2d[old.draft_ids].all())
    for k, v in old.state_dict().items():
        if k not in ("lm_head.weight", "d2t", "t2d"):
            torch.testing.assert_close(new.state_dict()[k], v, atol=1e-2, rtol=1e-2)
    at = {int(t): i for i, t in enumerate(new.draft_ids)}
    rows = torch.tensor([at[int(t)] for t in old.draft_ids])
    torch.testing.assert_close(new.lm_head.weight[rows], old.lm_head.weight)
    kept = train(config(target_dir, tmp_path / "kept", max_steps=1, draft_vocab=0, init_from=str(wide)))
    assert torch.equal(load_head(kept).d2t, new.d2t)  # no --draft-vocab: the head's own vocabulary
    with pytest.raises(FeatspecError, match="widened, not narrowed"):
        train(config(target_dir, tmp_path / "narrow", max_steps=1, draft_vocab=256, init_from=str(first)))


def test_block_head_starts_from_an_eagle3_head(tiny_target_dir, tmp_path):
    """--init-from an EAGLE-3 head: the block head keeps its fusion, layer and vocabulary (frozen), its slot layer
    starts as a copy of the EAGLE-3 layer and its slot embeddings at the mean real one; per-position agreement is
    logged for every block position."""
    target_dir, _ = tiny_target_dir
    e3 = load_head(train(config(target_dir, tmp_path / "e3", max_steps=1)))
    block_dir = train(config(target_dir, tmp_path / "b", method="block", block_size=3, anchors=4, max_steps=0,
                             epochs=1, lr=1e-12, init_from=str(tmp_path / "e3" / "head")))
    block = load_head(block_dir)
    assert block.kind == "block" and block.block_size == 3
    torch.testing.assert_close(block.d2t, e3.d2t)
    for name, w in e3.midlayer.state_dict().items():  # position 0 stays the EAGLE-3 head's (frozen) ...
        torch.testing.assert_close(block.midlayer.state_dict()[name], w, rtol=0, atol=0)
        # ... and the slot layer starts as its copy
        torch.testing.assert_close(block.slot_layer.state_dict()[name], w, rtol=1e-3, atol=1e-6)
    assert float(block.mask_embed.abs().sum()) > 0
    evals = json.loads((tmp_path / "b" / "train_log.json").read_text())["evals"]
    assert {"acc_0", "acc_1", "acc_2"} <= set(evals[-1])
