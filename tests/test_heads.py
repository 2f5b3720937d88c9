"""EAGLE-1 / EAGLE-3 heads on tiny configs: shapes, vocabulary mapping, TTT == drafting, checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch

from featspec.errors import FeatspecError
from featspec.heads.checkpoint import export_head, load_head, save_head, validate_against
from featspec.heads.eagle1 import Eagle1Head
from featspec.heads.eagle3 import Eagle3Head, default_layer_ids
from featspec.heads.layers import HeadConfig

from conftest import build_model, gemma3_config, llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

EAGLE3_KEYS = {
    "fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight", "norm.weight", "lm_head.weight",
    "d2t", "t2d",
}
EAGLE1_KEYS = {
    "fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight",
}


@pytest.fixture(scope="module")
def target():
    return build_model(llama_config(layers=6), seed=0)


def make_eagle3(target, draft_vocab: int = 40, seed: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head(HeadConfig.from_target(target.config, draft_vocab_size=draft_vocab))
    head.set_vocab(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    return head.bind(target).eval()


def make_eagle1(target, seed: int = 0) -> Eagle1Head:
    torch.manual_seed(seed)
    return Eagle1Head(HeadConfig.from_target(target.config)).bind(target).eval()


def saved_without(tmp_path, head, key: str):
    """Save `head`, then drop `key` from its config.json, as a third-party checkpoint would lack it."""
    save_head(head, tmp_path / "h", dtype=torch.float32)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    del cfg[key]
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "h"


def test_eagle3_shapes_and_layout(target):
    head = make_eagle3(target)
    c = target.config
    assert set(head.state_dict()) == EAGLE3_KEYS
    assert head.fc.weight.shape == (c.hidden_size, 3 * c.hidden_size)
    assert head.midlayer.self_attn.q_proj.weight.shape[1] == 2 * c.hidden_size
    assert head.lm_head.weight.shape == (40, c.hidden_size)
    assert head.layer_ids == default_layer_ids(6) == (2, 3, 3)
    hs = [torch.randn(2, 5, c.hidden_size) for _ in head.layer_ids]
    feats = head.fuse(hs)
    out = head(feats, torch.randint(0, c.vocab_size, (2, 5)), torch.arange(5)[None].expand(2, 5))
    assert out.shape == (2, 5, c.hidden_size)
    assert head.logits(out).shape == (2, 5, 40)
    assert head.d2t.dtype == torch.int64 and head.t2d.dtype == torch.bool


def test_eagle1_shapes_and_layout(target):
    head = make_eagle1(target)
    c = target.config
    assert set(head.state_dict()) == EAGLE1_KEYS
    assert head.fc.weight.shape == (c.hidden_size, 2 * c.hidden_size)
    feats = head.fuse([torch.randn(1, 4, c.hidden_size)])
    out = head(feats, torch.randint(0, c.vocab_size, (1, 4)), torch.arange(4)[None])
    assert out.shape == (1, 4, c.hidden_size)
    assert head.logits(out).shape == (1, 4, c.vocab_size)  # the target's own LM head


def test_draft_vocab_mapping_roundtrip(target):
    head = make_eagle3(target, draft_vocab=30, seed=3)
    draft = torch.arange(30)
    target_ids = head.to_target_ids(draft)
    assert torch.equal(draft + head.d2t, target_ids)
    assert int(head.t2d.sum()) == 30 and bool(head.t2d[target_ids].all())
    assert torch.equal(head.t2d.nonzero().flatten(), target_ids.sort().values)
    with pytest.raises(ValueError):
        head.set_vocab(torch.zeros(30, dtype=torch.long))  # duplicates


def test_widened_vocab_keeps_trained_rows_and_maps_new_ones():
    """Widening a draft vocabulary keeps every other tensor and every shared row; when the trained rows are an
    exact affine image of the target's output rows, a new token's row is that same image of its target row."""
    target = build_model(llama_config(vocab=256, hidden=16), seed=0)
    out_rows = target.get_output_embeddings().weight.detach()
    small = make_eagle3(target, draft_vocab=100, seed=1)  # more shared rows than the fit has unknowns (16 + 1)
    h = out_rows.shape[1]
    torch.manual_seed(2)
    m, b = torch.randn(h, h), torch.randn(h)
    with torch.no_grad():
        small.lm_head.weight.copy_(out_rows[small.draft_ids] @ m + b)
    wide = Eagle3Head(HeadConfig.from_target(target.config, draft_vocab_size=120))
    extra = [t for t in range(target.config.vocab_size) if not bool(small.t2d[t])][:20]
    wide.set_vocab(torch.cat([small.draft_ids, torch.tensor(extra)]).sort().values)
    state = wide.widened_state(small.state_dict(), out_rows, ridge=1e-6)
    wide.load_state_dict(state)
    assert torch.equal(wide.draft_ids, torch.cat([small.draft_ids, torch.tensor(extra)]).sort().values)
    for k, v in small.state_dict().items():
        if k not in ("lm_head.weight", "d2t", "t2d"):
            assert torch.equal(wide.state_dict()[k], v)
    at = {int(t): i for i, t in enumerate(wide.draft_ids)}
    shared = torch.tensor([at[int(t)] for t in small.draft_ids])
    assert torch.equal(wide.lm_head.weight[shared], small.lm_head.weight)
    new = torch.tensor([at[t] for t in extra])
    torch.testing.assert_close(wide.lm_head.weight[new], out_rows[torch.tensor(extra)] @ m + b, atol=1e-3, rtol=1e-3)
    narrow = make_eagle3(target, draft_vocab=120, seed=5)  # a vocabulary that lacks some of small's ids
    with pytest.raises(ValueError, match="every draft id"):
        narrow.widened_state(small.state_dict(), out_rows)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_training_time_test_equals_drafting(target, kind):
    """Step j of the TTT forward at index t == drafting j tokens past real features ending at t - j."""
    head = make_eagle3(target) if kind == "eagle3" else make_eagle1(target)
    c = target.config
    t_len, steps = 9, 4
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(1, t_len, c.hidden_size, generator=g) for _ in head.layer_ids]
    tokens = torch.randint(0, c.vocab_size, (1, t_len), generator=g)
    pos = torch.arange(t_len)[None]
    with torch.no_grad():
        real = head.fuse(hidden)
        past, feats, outs = [], real, []
        for _ in range(steps):
            out = head(feats, tokens, pos, ttt_past=past)
            outs.append(out)
            feats = torch.nn.functional.pad(out[:, :-1], (0, 0, 1, 0))
        for j in range(steps):
            for t in range(j, t_len):
                cache = head.new_cache()
                o = head(real[:, : t - j + 1], tokens[:, : t - j + 1], pos[:, : t - j + 1], cache)[:, -1:]
                for i in range(1, j + 1):
                    p = t - j + i
                    o = head(o, tokens[:, p : p + 1], pos[:, p : p + 1], cache)
                torch.testing.assert_close(outs[j][:, t], o[:, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_save_load_roundtrip(tmp_path, target, kind):
    head = make_eagle3(target) if kind == "eagle3" else make_eagle1(target)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    if kind == "eagle3":
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 40
        assert "eagle_aux_hidden_state_layer_ids" not in cfg  # default layers: left out on purpose
    loaded = load_head(tmp_path / "h")
    assert loaded.kind == kind
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not list((tmp_path).glob(".h-*"))  # no temp dir left behind


def test_export_vllm_reloads_identically(tmp_path, target):
    head = make_eagle3(target)
    save_head(head, tmp_path / "src")
    # a third-party checkpoint with a stray prefix and the shared embedding inside
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
    tensors = {("model." + k if k.startswith("fc") else k): v for k, v in tensors.items()}
    tensors["embed_tokens.weight"] = torch.zeros(target.config.vocab_size, target.config.hidden_size)
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    info = export_head(str(tmp_path / "src"), "vllm", tmp_path / "out")
    assert info["kind"] == "eagle3"
    from safetensors.torch import load_file as lf

    out = lf(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == EAGLE3_KEYS
    a, b = load_head(tmp_path / "src"), load_head(tmp_path / "out")
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])


def test_validation_names_both_numbers(tmp_path, target):
    head = make_eagle3(target)
    other = gemma3_config(hidden=32)
    with pytest.raises(FeatspecError, match="48.*32"):
        validate_against(head, other)
    bigger_vocab = llama_config(layers=6, vocab=128)
    with pytest.raises(FeatspecError, match="96.*128"):
        validate_against(head, bigger_vocab)
    more_layers = llama_config(layers=8)
    with pytest.raises(FeatspecError, match="6 layers.*8"):
        validate_against(head, more_layers)
    validate_against(head, target.config)  # the right target passes


def test_load_errors_are_one_line(tmp_path, target):
    with pytest.raises(FeatspecError, match="not found"):
        load_head(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FeatspecError, match="lacks hidden_size"):
        load_head(tmp_path / "empty")
    head = make_eagle3(target)
    save_head(head, tmp_path / "h")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "h" / "config.json").read_text())
    with pytest.raises(FeatspecError, match="no model.safetensors"):
        load_head(tmp_path / "noweights")
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "h" / "model.safetensors"))
    t["norm.weight"] = t["norm.weight"][:10].contiguous()
    save_file(t, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(FeatspecError, match="shape"):
        load_head(tmp_path / "h")


def test_third_party_eagle3_without_featspec_block(tmp_path, target):
    """A vLLM/SGLang-style checkpoint (no featspec extras) loads; fusion layers default once validated."""
    head = make_eagle3(target)
    loaded = load_head(saved_without(tmp_path, head, "featspec"))
    assert loaded.layer_ids == ()
    validate_against(loaded, target.config)
    assert loaded.layer_ids == head.layer_ids
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_norm_before_residual_is_saved_and_changes_the_output(tmp_path, target, norm_before_residual):
    """config.json records which residual convention the head uses (vLLM reads the same key, default False),
    and the reloaded head computes the same features; the two conventions really differ."""
    head = make_eagle3(target)
    head.cfg.norm_before_residual = norm_before_residual
    save_head(head, tmp_path / "h", dtype=torch.float32)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["norm_before_residual"] is norm_before_residual
    back = load_head(tmp_path / "h").bind(target).eval()
    assert back.cfg.norm_before_residual is norm_before_residual
    feats = 3 * torch.randn(1, 4, target.config.hidden_size)
    tokens, pos = torch.randint(0, target.config.vocab_size, (1, 4)), torch.arange(4)[None]
    with torch.no_grad():
        a, b = head(feats, tokens, pos), back(feats, tokens, pos)
        head.cfg.norm_before_residual = not norm_before_residual
        other = head(feats, tokens, pos)
    torch.testing.assert_close(a, b)
    assert (a - other).abs().max() > 1e-3


def test_third_party_eagle3_defaults_to_the_official_residual(tmp_path, target):
    """A config.json without the key (official EAGLE-3 checkpoints) loads with the residual taken from fc(h) itself, not from hidden_norm(fc(h))."""
    head = make_eagle3(target)
    assert load_head(saved_without(tmp_path, head, "norm_before_residual")).cfg.norm_before_residual is False


def test_init_from_target_reads_features_like_the_target(target):
    """After init_from_target, the head's output layer gives the target's logits over the draft vocabulary."""
    head = make_eagle3(target)
    head.init_from_target(target)
    x = 2 * torch.randn(3, target.config.hidden_size)
    with torch.no_grad():
        want = target.lm_head(target.model.norm(x))[:, head.draft_ids]
        torch.testing.assert_close(head.logits(x), want, rtol=1e-5, atol=1e-5)


def test_init_from_target_on_gemma_uses_its_effective_norm_scale():
    """Gemma's RMSNorm scales by (1 + w): the copied scale is the effective one, not the raw parameter."""
    gemma = build_model(gemma3_config(), seed=0)
    with torch.no_grad():
        gemma.model.norm.weight.normal_()
    head = make_eagle3(gemma)
    head.init_from_target(gemma)
    x = torch.randn(2, gemma.config.hidden_size)
    with torch.no_grad():
        want = gemma.lm_head(gemma.model.norm(x))[:, head.draft_ids]
        torch.testing.assert_close(head.logits(x), want, rtol=1e-4, atol=1e-4)
