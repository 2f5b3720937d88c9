"""Mini models end to end (`featspec xmodal prepare --tiny`), resume, and the real-model checkpoint layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from featspec.cli import main
from featspec.xmodal.models.eventchat import EVENT_TOKEN_INDEX, EventChatConfig, EventChatModel
from featspec.xmodal.models.real import load_eventgpt, load_video_llava
from featspec.xmodal.train.prepare import PrepareConfig, prepare
from featspec.xmodal.models.vlm import load_mini
from featspec.models.registry import resolve_source


def test_prepare_tiny_writes_loadable_models(tiny_run):
    report = json.loads((tiny_run / "prepare.json").read_text())
    assert report["target"]["visual_tokens"] >= 5 * report["drafter"]["visual_tokens"]
    target = load_mini(tiny_run / "target", torch.float32)
    drafter = load_mini(tiny_run / "drafter", torch.float32)
    assert type(target.model).__name__ == "VideoLlavaForConditionalGeneration"
    assert isinstance(drafter.model, EventChatModel)
    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    ids = target.generate(frames, "How many objects are there?", max_new_tokens=4)
    assert 0 < len(ids) <= 4
    # the trained LoRA deltas changed the backbone: merged weights differ from the pretrained ones
    assert any(k.endswith("lora_b") and v.abs().sum() > 0 for k, v in
               __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tiny_run / "target" / "weights.safetensors")).items())


def test_eval_and_show_on_tiny_models(tiny_run, tmp_path, capsys):
    out = tmp_path / "ev.json"
    assert main(["xmodal", "eval", "--models", str(tiny_run), "--limit", "3", "--max-new-tokens", "4",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for role in ("target", "drafter"):
        acc = result[role]["accuracy"]
        assert set(acc) == {"direction", "count", "shape", "colour", "speed"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in acc.values())
        assert result["prefill_ms"][role] > 0
    assert len(result["samples"]) == 3
    png = tmp_path / "show.png"
    assert main(["xmodal", "show", "--models", str(tiny_run), "--index", "1", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_prepare_resumes_exactly(tmp_path):
    """A run killed mid-stage and restarted ends with the same weights as an uninterrupted one."""
    full = PrepareConfig.tiny(tmp_path / "full")
    prepare(full, progress=False)
    cut = PrepareConfig.tiny(tmp_path / "cut")
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the target's QA stage, after its step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(cut, progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    assert not (tmp_path / "cut" / "target").exists()
    prepare(cut, progress=False)
    from safetensors.torch import load_file

    for role in ("target", "drafter"):
        a = load_file(str(tmp_path / "full" / role / "weights.safetensors"))
        b = load_file(str(tmp_path / "cut" / role / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_init_continues_one_role_from_a_run(tiny_run, tmp_path, capsys):
    """`--roles target --init RUN` trains only the target, starting from RUN's weights (not from scratch)."""
    from safetensors.torch import load_file

    out = tmp_path / "more"
    assert main(["xmodal", "prepare", "--tiny", "--out", str(out), "--roles", "target", "--init", str(tiny_run)]) == 0
    assert (out / "target").is_dir() and not (out / "drafter").exists()
    assert json.loads((out / "target" / "config.json").read_text())["init"] == str(tiny_run)
    before = load_file(str(tiny_run / "target" / "weights.safetensors"))
    after = load_file(str(out / "target" / "weights.safetensors"))
    assert set(after) == set(before)
    # a few steps from RUN's towers and projectors stay close to them; a fresh (random) start would not
    cos = torch.nn.functional.cosine_similarity
    for k in before:
        # weight matrices start random; the temporal mixers' output projections start at zero, so a few steps
        # move them a lot relative to their size
        if not k.endswith(("lora_a", "lora_b", "temporal.attn.out_proj.weight")) and before[k].dim() == 2:
            assert cos(after[k].float().flatten(), before[k].float().flatten(), dim=0) > 0.9, k
    assert any(not torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert main(["xmodal", "prepare", "--tiny", "--out", str(tmp_path / "x"), "--roles", "drafter",
                 "--init", str(out)]) == 2
    assert "has no drafter/weights.safetensors" in capsys.readouterr().err


def _tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))


def test_tiny_video_llava_checkpoint_loads(tmp_path):
    tok = _tokenizer()
    cfg = VideoLlavaConfig(vision_config=dict(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2),
                           text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
                           video_token_index=16, image_token_index=15, vision_feature_layer=-2)
    torch.manual_seed(0)
    VideoLlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "vl")
    tok.save_pretrained(tmp_path / "vl")
    vlm = load_video_llava(str(tmp_path / "vl"), torch.float32, "cpu")
    assert vlm.visual_tokens == 8 * 5
    frames = np.zeros((8, 40, 40, 3), dtype=np.uint8)
    inputs = vlm.inputs(frames, "What happens?")
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 28, 28)
    assert (inputs["input_ids"] == 16).sum() == 40
    with torch.no_grad():
        direct = vlm.model(**inputs).logits[0, -1]
        via_embeds = vlm.model(inputs_embeds=vlm.embeds(inputs)).logits[0, -1]
    assert torch.allclose(direct, via_embeds, atol=1e-5)
    assert len(vlm.generate(frames, "What happens?", max_new_tokens=3)) <= 3


def test_tiny_eventgpt_checkpoint_loads_in_its_layout(tmp_path):
    """EventGPT keeps its CLIP tower apart (mm_visual_tower) and names tower keys with vision_model."""
    tok = _tokenizer()
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    tower.save_pretrained(tmp_path / "clip")
    cfg = EventChatConfig(mm_visual_tower=str(tmp_path / "clip"), vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = EventChatModel(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".visual_tower." not in k}
    (tmp_path / "eg").mkdir()
    save_file(state, str(tmp_path / "eg" / "model.safetensors"))
    raw = cfg.to_dict()
    raw.update(architectures=["EventChatModel"], model_type="EventChat_llama", event_feature_adaptor=True)
    raw.pop("visual_config", None)
    (tmp_path / "eg" / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(tmp_path / "eg")
    vlm = load_eventgpt(str(tmp_path / "eg"), torch.float32, "cpu")
    assert vlm.visual_tokens == 5 + 5
    loaded = vlm.model.model.visual_tower.visual_tower.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tower.state_dict().items())
    assert torch.equal(vlm.model.model.feature_adaptor.weight, model.model.feature_adaptor.weight)
    images = np.full((5, 30, 30, 3), 255, dtype=np.uint8)
    inputs = vlm.inputs(images, "What moves?")
    assert (inputs["input_ids"] == EVENT_TOKEN_INDEX).sum() == 1 and inputs["input_ids"][0, 0] == tok.bos_token_id or tok.bos_token_id is None
    with torch.no_grad():
        assert vlm.model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 1 + 10
    # a layout with keys missing is refused with one line naming the first missing key
    save_file({k: v for k, v in state.items() if "feature_adaptor" not in k}, str(tmp_path / "eg" / "model.safetensors"))
    from featspec.errors import FeatspecError

    with pytest.raises(FeatspecError, match="missing model.feature_adaptor"):
        load_eventgpt(str(tmp_path / "eg"), torch.float32, "cpu")


@pytest.mark.parametrize("role", ["target", "drafter"])
def test_packed_turns_equal_single_turn_prompts(tiny_run, role):
    """Training packs every question of a clip after one visual prefix; each turn's loss must equal the
    loss of that question asked alone (the inference prompt), so packing changes cost, not the objective."""
    from featspec.xmodal.world.scenes import WorldConfig
    from featspec.xmodal.train.prepare import qa_loss, qa_rows
    from featspec.xmodal.world.clips import build_split

    vlm = load_mini(tiny_run / role, torch.float32)
    data = build_split(WorldConfig(), "train", 2, progress=False)
    packed = qa_rows(vlm, data, [0, 1], step=3, seed=0, grounding_turns=3)
    plain = qa_rows(vlm, data, [0, 1], step=3, seed=0)
    assert all(len(spans) >= 4 for spans in plain["turns"])
    extra = 3 if role == "target" else 0  # grounding turns name the video prompt's frame labels
    assert [len(s) for s in packed["turns"]] == [len(s) + extra for s in plain["turns"]]
    total, tokens = 0.0, 0
    for r, spans in enumerate(packed["turns"]):
        for a, p, b in spans:
            ids = torch.cat([packed["input_ids"][r, : packed["prefix"]], packed["input_ids"][r, a:b]])
            single = {"input_ids": ids[None], "prefix": packed["prefix"],
                      "turns": [[(packed["prefix"], packed["prefix"] + p - a, len(ids))]],
                      "pixels": packed["pixels"][r: r + 1]}
            with torch.no_grad():
                total += float(qa_loss(vlm, single)[0]) * (b - p)
            tokens += b - p
    with torch.no_grad():
        joint = float(qa_loss(vlm, packed)[0])
    assert joint == pytest.approx(total / tokens, rel=1e-4)


@pytest.mark.parametrize("role", ["target", "drafter"])
def test_position_keeper_trains_the_projector_to_keep_positions(tiny_run, role):
    """`--keep-weight`: probe heads on the projected visual tokens (the target's video tokens, the drafter's
    time-averaged event tokens) and on the language model's states there; their loss reaches the projector,
    and a few steps on it lower it."""
    from featspec.xmodal.world.scenes import WorldConfig
    from featspec.xmodal.train.prepare import PositionKeeper, dense_targets, pooled_over_time, qa_loss, qa_rows
    from featspec.xmodal.world.clips import build_split

    torch.manual_seed(0)
    vlm = load_mini(tiny_run / role, torch.float32)
    world = WorldConfig()
    data = build_split(world, "train", 4, progress=False)
    if role == "target":
        text, patch = vlm.model.config.text_config, vlm.model.config.vision_config.patch_size
        proj = vlm.model.model.multi_modal_projector
        first = proj.linear_1
    else:
        text, patch = vlm.model.config, vlm.model.model.visual_tower.visual_tower.config.patch_size
        proj = vlm.model.model.visual_projector
        first = proj[0]
    keeper = PositionKeeper(text.hidden_size, world, text.num_hidden_layers, with_colour=role == "target")
    assert keeper.layers == [1]  # the tiny models have 1-2 layers: one tap inside, plus the projector output
    dense = dense_targets(world, data.scenes, "video" if role == "target" else "events", patch)
    if role == "drafter":
        dense = pooled_over_time(dense)
    proj.requires_grad_(True)
    opt = torch.optim.Adam([*proj.parameters(), *keeper.parameters()], lr=3e-3)
    batch = qa_rows(vlm, data, [0, 1, 2, 3], step=0, seed=0)
    losses = []
    for _ in range(8):
        _, aux, _ = qa_loss(vlm, batch, keeper, dense)
        opt.zero_grad()
        aux.backward()
        assert first.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(aux.item())
    assert losses[-1] < 0.8 * losses[0]
    assert float(qa_loss(vlm, batch)[1]) == 0.0  # no keeper, no auxiliary loss


@pytest.mark.real
def test_shipped_minis_load_and_read_counts_and_shapes():
    """The minis shipped in featspec/assets/xmodal load over the PyPI backbone, keep the >= 5x visual-token
    ratio, and the target reads what it was trained to read (fp32 here: 6/8 counts and 7/8 shapes on the
    first 8 test clips when this was written; chance is 1/3 and 1/4)."""
    from featspec.xmodal.evaluate import SHIPPED, load_pair
    from featspec.xmodal.world.qa import parse, questions
    from featspec.xmodal.world.clips import build_split

    target, drafter, world = load_pair(SHIPPED, torch.float32)
    assert target.visual_tokens == 136 and drafter.visual_tokens == 22
    data = build_split(world, "test", 8, progress=False)
    for kind in ("count", "shape"):
        right = 0
        for i in range(8):
            qa = next(q for q in questions(data.scenes[i], seed=i) if q.kind == kind)
            answer = target.tokenizer.decode(target.generate(data.frames[i], qa.question, 40))
            right += parse(answer, kind) == parse(qa.answer, kind)
        assert right >= 5, f"{kind}: {right}/8"


def test_position_probe_reads_planted_positions_and_runs_on_a_mini(tiny_run):
    """The ridge score finds a position that is linearly in the features and not one that is absent; the probe
    covers the tower, the language model's input and layers, and the answer position."""
    from featspec.xmodal.train.position_probe import position_probe, ridge_corr
    from featspec.xmodal.world.scenes import WorldConfig

    rng = np.random.default_rng(0)
    y = rng.uniform(size=200)
    noise = rng.normal(size=(200, 16))
    assert ridge_corr(np.column_stack([noise, y + 0.05 * rng.normal(size=200)]), y) > 0.95
    assert ridge_corr(noise, y) < 0.4
    scores = position_probe(load_mini(tiny_run / "target", torch.float32), WorldConfig(), 24)
    assert {"tower f1", "lm0 f1", "lm2 f8", "answer lm2"} <= set(scores)
    assert all(-1 <= v <= 1 for v in scores.values())


def test_attention_guide_reads_the_models_own_attention_and_moves_it(tiny_run):
    """`--attend-weight`: the guide recomputes the attention of its layers at the positions that write a
    quoted coordinate; it must equal the weights the model itself uses (eager attention), mark the named
    object's patches in the named frame, and a few steps on its loss must raise the mass there."""
    from featspec.xmodal.train.guide import AttentionGuide, look_targets
    from featspec.xmodal.world.scenes import WorldConfig
    from featspec.xmodal.train.prepare import dense_targets, qa_loss, qa_rows, turn_mask
    from featspec.xmodal.world.clips import build_split

    torch.manual_seed(0)
    vlm = load_mini(tiny_run / "target", torch.float32)
    world = WorldConfig()
    data = build_split(world, "train", 4, progress=False)
    dense = dense_targets(world, data.scenes, "video", vlm.model.config.vision_config.patch_size)
    batch = qa_rows(vlm, data, [0, 1, 2, 3], step=0, seed=0, grounding_turns=2)
    words = [[vlm.tokenizer.decode([t]).strip() for t in row] for row in batch["input_ids"].tolist()]
    assert batch["looks"] and all(words[r][p + 1].isdigit() for r, p, *_ in batch["looks"])
    lang = vlm.model.model.language_model
    guide = AttentionGuide(lang)
    assert guide.layers == [0, 1]
    ids = batch["input_ids"]
    video = (ids[0] == vlm.model.config.video_token_id).nonzero()[:, 0]
    rows, queries, targets = look_targets(batch["looks"], video, len(video) // 8, dense["owner"], ids.shape[1])
    assert len(rows) and targets.sum(1).min() >= 1
    assert bool((ids[rows[:, None].expand_as(targets)[targets], targets.nonzero()[:, 1]] == vlm.model.config.video_token_id).all())

    # the recomputed attention equals the model's eager attention weights at those positions
    emb = vlm.with_video(ids, vlm.video_features(batch["pixels"]))
    mask, pos = turn_mask(emb.shape[0], emb.shape[1], batch["prefix"], batch["turns"], emb.dtype)
    lang.config._attn_implementation = "eager"
    with torch.no_grad():
        out = lang(inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_attentions=True)
        for k in guide.layers:
            hidden, cos, sin = guide.seen[k]
            eager = out.attentions[k][rows, :, queries]  # (N, heads, W)
            mass = (eager * targets[:, None]).sum(-1).max(-1).values
            one = AttentionGuide.__new__(AttentionGuide)
            one.layers, one.modules, one.seen = [k], [guide.modules[guide.layers.index(k)]], {k: (hidden, cos, sin)}
            assert float(one.loss(mask, queries, rows, targets)) == pytest.approx(float(-mass.clamp_min(1e-6).log().mean()), rel=1e-4)
    guide.seen.clear()
    lang.config._attn_implementation = "sdpa"

    params = [p for n, p in vlm.model.named_parameters() if "language_model" in n and ("q_proj" in n or "k_proj" in n)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(6):
        _, _, attend = qa_loss(vlm, batch, dense=dense, guide=guide)
        opt.zero_grad()
        attend.backward()
        opt.step()
        losses.append(attend.item())
    guide.remove()
    assert losses[-1] < 0.8 * losses[0]
    assert float(qa_loss(vlm, batch)[2]) == 0.0  # no guide, no attention loss
