"""Cross-modal drafting on the tiny world: feature pairing, adapters, and greedy exactness through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from featspec.xmodal.train.adapter import measure, train_adapter
from featspec.xmodal.drafting.adapters import LEVELS, Adapter, build_adapter
from featspec.xmodal.drafting.align import align, last_hidden, sequences
from featspec.xmodal.world.qa import question_for
from featspec.xmodal.world.scenes import WorldConfig
from featspec.xmodal.models.vlm import load_mini, to_pixels
from featspec.xmodal.world.clips import build_split
from featspec.xmodal.drafting.drafter import CrossModalDrafter
from featspec.engine import SpeculativeGenerator
from featspec.models.target import TargetModel


@pytest.fixture(scope="module")
def world(tiny_run):
    torch.manual_seed(0)
    target = load_mini(tiny_run / "target", torch.float32)
    drafter = load_mini(tiny_run / "drafter", torch.float32)
    data = build_split(WorldConfig(), "val", 6, progress=False)
    pairs = align(target, drafter, data, 4, max_new_tokens=8, progress=False)
    return target, drafter, data, pairs


def test_pairs_align_positions_on_the_same_tokens(world):
    """Row j of a clip is each model's state after reading the same tokens: recomputing either model on the
    answer cut after token[j] gives the same last-position feature."""
    target, drafter, data, pairs = world
    seq = sequences(pairs)[1]
    qa = question_for(data.scenes[1], 1)
    answer = seq["next"].tolist()
    assert seq["token"][1:].tolist() == answer[:-1]
    for j in (0, 2, len(answer) - 1):
        for vlm, images, key in ((target, data.frames[1], "target"), (drafter, data.event_images[1], "draft")):
            h, _, p = last_hidden(vlm, images, qa.question, answer[:j])
            assert torch.allclose(h[p - 1 + j].to(torch.bfloat16).float(), seq[key][j].float(), atol=0.02, rtol=0.02)
    assert pairs["visual"].shape[1] == target.visual_tokens


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_lowers_its_loss(world, level):
    target, drafter, _, pairs = world
    adapter, losses = train_adapter(level, pairs, target.model.lm_head, target.model.get_input_embeddings(),
                                    steps=30, batch=4, lr=3e-3, progress=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    stats = measure(adapter, pairs, target.model.lm_head, drafter.model.lm_head)
    assert 0 <= stats["top1"] <= 1 and stats["params"] == sum(p.numel() for p in adapter.parameters())
    assert stats["accept@0.80"] >= stats["accept@0.95"]


def test_level_shapes_follow_the_spec():
    h = 576
    l1 = build_adapter("L1", h, h)
    assert [m.out_features for m in l1.block.mlp if isinstance(m, torch.nn.Linear)] == [h // 16, h]
    l3 = build_adapter("L3", h, h)
    assert [m.out_features for m in l3.block.mlp if isinstance(m, torch.nn.Linear)] == [h // 4, h // 4, h]
    assert len(build_adapter("L2", h, h).blocks) == 3
    assert "embed" not in dict(build_adapter("L5", h, h, embed=torch.nn.Embedding(10, h)).named_modules())


class OracleAdapter(Adapter):
    """Returns the target's own feature for even answer positions and noise for odd ones, so drafts are
    accepted and rejected in turn: exercises the drafter's cache and history bookkeeping."""

    level = "oracle"
    needs_history = True

    def __init__(self, target_feats: torch.Tensor) -> None:
        super().__init__(target_feats.shape[-1], target_feats.shape[-1])
        self.feats = target_feats
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, feats, tokens=None, visual=None):
        j = feats.shape[1] - 1
        if j < len(self.feats) and j % 3 != 2:
            out = self.feats[j].float()
        else:
            out = torch.randn(feats.shape[-1])
        return out.expand(1, feats.shape[1], -1)


def _run(target, drafter, data, i, adapter, length=3, parallel=False):
    qa = question_for(data.scenes[i], i)
    ref = target.generate(data.frames[i], qa.question, 12)
    inputs = target.inputs(data.frames[i], qa.question)
    d = CrossModalDrafter(drafter, drafter.prompt_ids(qa.question), to_pixels(data.event_images[i], drafter.image_size)[None],
                          target.model.lm_head, adapter, length, target.model.config.video_token_id, parallel=parallel)
    gen = SpeculativeGenerator(TargetModel(target.model), d, target.eos_ids)
    out = gen.generate(inputs["input_ids"][0].tolist(), 12, prefill_inputs={"pixel_values_videos": inputs["pixel_values_videos"]})
    new = out.new_ids[:-1] if out.new_ids and out.new_ids[-1] in target.eos_ids else out.new_ids
    return new, ref, out, d


@pytest.mark.parametrize("level", [None, *LEVELS])
def test_greedy_output_is_the_targets(world, level):
    target, drafter, data, pairs = world
    adapter = None if level is None else build_adapter(level, 576, 576, embed=target.model.get_input_embeddings()).eval()
    for i in (4, 5):
        new, ref, _, _ = _run(target, drafter, data, i, adapter)
        assert new == ref


def test_accepted_drafts_keep_the_drafter_in_sync(world):
    target, drafter, data, pairs = world
    seq = sequences(pairs)[0]
    new, ref, out, _ = _run(target, drafter, data, 0, OracleAdapter(seq["target"]))
    assert new == ref
    assert out.tau > 1.3  # the oracle positions were accepted
    assert any(s.accepted < s.tree_size - 1 for s in out.steps)  # and the noisy ones rejected


@pytest.mark.parametrize("level", [None, "L1"])
def test_parallel_prefill_is_exact_and_drafts_ahead(world, level):
    target, drafter, data, pairs = world
    adapter = None if level is None else build_adapter(level, 576, 576).eval()
    for i in (4, 5):
        new, ref, out, d = _run(target, drafter, data, i, adapter, parallel=True)
        assert new == ref
        assert set(d.timeline) == {"drafter_prefill", "draft_ahead", "wait_for_drafter"}


def test_parallel_prefill_first_verify_checks_the_drafts_made_ahead(world):
    """With an oracle adapter the drafts made during the target's prefill are right, so the first
    verification accepts them although no drafting happened after the prefill."""
    target, drafter, data, pairs = world
    seq = sequences(pairs)[0]
    new, ref, out, d = _run(target, drafter, data, 0, OracleAdapter(seq["target"]), parallel=True)
    assert new == ref
    first = out.steps[0]
    assert first.tree_size == 4 and first.accepted >= 1
    assert first.draft_s < d.timeline["draft_ahead"][1] - d.timeline["drafter_prefill"][0]
    with pytest.raises(ValueError, match="L6"):
        CrossModalDrafter(drafter, drafter.prompt_ids("q"), torch.zeros(1, 5, 3, 64, 64), target.model.lm_head,
                          build_adapter("L6", 576, 576), 3, parallel=True)


def test_failed_target_prefill_leaves_no_parallel_work_running(world):
    """If the target's prefill raises, generate re-raises only after the drafter's thread has stopped."""
    import threading

    target, drafter, data, _ = world

    class Broken(TargetModel):
        def prefill(self, *args, **kwargs):
            raise RuntimeError("prefill broke")

    qa = question_for(data.scenes[0], 0)
    d = CrossModalDrafter(drafter, drafter.prompt_ids(qa.question), to_pixels(data.event_images[0], drafter.image_size)[None],
                          target.model.lm_head, None, 3, parallel=True)
    gen = SpeculativeGenerator(Broken(target.model), d, target.eos_ids)
    with pytest.raises(RuntimeError, match="prefill broke"):
        gen.generate(target.prompt_ids(qa.question), 4)
    assert d._thread is None and d.ahead == []
    assert not any(t.name == "xmodal-parallel-prefill" for t in threading.enumerate())


def test_adapter_save_load_roundtrip(tmp_path):
    from featspec.xmodal.train.adapter import load_adapter, save_adapter

    emb = torch.nn.Embedding(50, 64)
    for level in LEVELS:
        a = build_adapter(level, 64, 64, embed=emb).eval()
        save_adapter(a, tmp_path / f"{level}.pt", {"note": "x", "val": {"top1": 0.5}})
        b = load_adapter(tmp_path / f"{level}.pt", emb)
        x, tok, vis = torch.randn(1, 5, 64), torch.randint(0, 50, (1, 5)), torch.randn(1, 7, 64)
        assert torch.equal(a(x, tok, vis), b(x, tok, vis))
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_trains_an_adapter_and_benches_every_drafting_method(tiny_run, tmp_path, capsys):
    from featspec.cli import main

    work = ["--models", str(tiny_run), "--work", str(tmp_path), "--dtype", "float32"]
    assert main(["xmodal", "train-adapter", "--level", "L1", "--clips", "2", "--steps", "3", "--val-clips", "2", *work]) == 0
    assert (tmp_path / "adapters" / "L1.pt").exists()
    assert main(["xmodal", "train-eagle3", "--clips", "8", "--steps", "2", *work]) == 0
    assert (tmp_path / "adapters" / "eagle3" / "config.json").exists()
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["xmodal", "bench", "--limit", "2", "--max-new-tokens", "6", "--methods",
                 "target,eagle3,xmodal-token,xmodal-L1,xmodal-pp,hybrid", "--json", str(out), "--png", str(png), *work]) == 0
    res = json.loads(out.read_text())["methods"]
    assert all(r["exact_match"] == 1.0 for r in res.values())
    pp = res["hybrid"]["parallel_prefill"]  # the measured decision: run it only where it saves more than it costs
    assert pp["runs"] == (pp["prefill_beside_drafter_s"] - pp["prefill_alone_s"] < pp["first_draft_s"])
    phases = {name for name, _, _ in res["xmodal-pp"]["timeline_first_clip"]}
    assert {"drafter_prefill", "draft_ahead", "verification"} <= phases
    assert png.stat().st_size > 10_000
    assert main(["xmodal", "bench", "--methods", "target,xmodal-L3", *work]) == 2  # untrained level: clear error
    assert "train-adapter --level L3" in capsys.readouterr().err
    # a fresh distribution: another seed, one object per clip; the report says which world it ran on
    assert main(["xmodal", "bench", "--limit", "1", "--max-new-tokens", "4", "--methods", "target,xmodal-L1", "--seed", "7",
                 "--max-objects", "1", "--json", str(out), *work]) == 0
    world = json.loads(out.read_text())["world"]
    assert world["seed"] == 7 and world["max_objects"] == 1
    assert main(["xmodal", "bench", "--spin-prob", "1.5", *work]) == 2
    assert "--spin-prob" in capsys.readouterr().err
    # adapters remember the minis they were fit to: over another target or drafter they are refused, not silently used
    stamp_file = tmp_path / "adapters" / "models.json"
    stamps = json.loads(stamp_file.read_text())
    assert set(stamps) == {"target", "drafter"} and "none" not in stamps.values()
    stamp_file.write_text(json.dumps({**stamps, "drafter": "0123456789abcdef"}))
    assert main(["xmodal", "bench", "--methods", "target,xmodal-L1", *work]) == 2
    assert "trained for another drafter" in capsys.readouterr().err
    assert main(["xmodal", "train-adapter", "--level", "L1", "--clips", "2", "--steps", "1", *work]) == 2
    assert main(["xmodal", "train-eagle3", "--clips", "8", "--steps", "1", *work]) == 0  # the head never reads the drafter
    stamp_file.write_text(json.dumps({**stamps, "target": "0123456789abcdef"}))
    assert main(["xmodal", "train-eagle3", "--clips", "8", "--steps", "1", *work]) == 2
    assert "trained for another target" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", [True, False])
def test_hybrid_drafts_cross_modal_first_then_with_the_targets_head(world, tmp_path, parallel):
    """With parallel prefill (where it pays) the drafter's drafts come first, then the head's; without it the
    head drafts from the first step (the drafter's would come late). Greedy output is the target's either way."""
    from featspec.xmodal.bench import Kit, make_drafter
    from featspec.xmodal.train.eagle_head import train_target_head
    from featspec.heads.checkpoint import load_head

    target, drafter, data, pairs = world
    train_target_head(target, data, tmp_path, tmp_path / "head", steps=2, batch_size=2, progress=False)
    head = load_head(tmp_path / "head").bind(target.model)
    kit = Kit(target, drafter, {"L1": build_adapter("L1", 576, 576).eval()}, head, 3, parallel={"runs": parallel})
    for i in (2, 3):
        qa = question_for(data.scenes[i], i)
        ref = target.generate(data.frames[i], qa.question, 10)
        d = make_drafter("hybrid", kit, qa.question, data.event_images[i])
        inputs = target.inputs(data.frames[i], qa.question)
        out = SpeculativeGenerator(TargetModel(target.model), d, target.eos_ids).generate(
            inputs["input_ids"][0].tolist(), 10, prefill_inputs={"pixel_values_videos": inputs["pixel_values_videos"]})
        new = out.new_ids[:-1] if out.new_ids and out.new_ids[-1] in target.eos_ids else out.new_ids
        assert new == ref
        if parallel:
            assert len(d.used) > 1 and d.used[0] == "xmodal" and set(d.used[1:]) == {"eagle3"}
        else:
            assert d.used and set(d.used) == {"eagle3"}
