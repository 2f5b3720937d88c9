"""The cross-modal world: event simulator, scenes and splits, QA parsing, LoRA merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featspec.xmodal.world.events import EventConfig, event_images, histogram, load_npy, save_npy, simulate, voxel_grid
from featspec.xmodal.models.lora import apply_lora, lora_state, merge_lora
from featspec.xmodal.world.qa import ATTRIBUTES, NUMBERS, parse, question_for, questions
from featspec.xmodal.world.scenes import SPLITS, WorldConfig, make_scene, render, render_timeline


def _ramp(d_log: float, steps: int = 11, size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Intensity whose log rises linearly by d_log (eps accounted for) over 1 s."""
    eps = EventConfig().eps
    logs = np.linspace(math.log(0.3 + eps), math.log(0.3 + eps) + d_log, steps)
    return (np.exp(logs) - eps)[:, None, None] * np.ones((steps, size, size)), np.linspace(0, 1, steps)


@pytest.mark.parametrize("d_log,c", [(1.0, 0.2), (-0.75, 0.2), (0.5, 0.15), (0.19, 0.2)])
def test_ramp_emits_floor_dl_over_c_events_of_its_polarity(d_log, c):
    intensity, times = _ramp(d_log)
    ev = simulate(intensity, times, EventConfig(c_pos=c, c_neg=c))
    per_pixel = math.floor(abs(d_log) / c + 1e-9)
    assert len(ev["t"]) == per_pixel * 9
    assert set(ev["p"].tolist()) <= {1 if d_log > 0 else 0}
    for x in range(3):
        t = ev["t"][(ev["x"] == x) & (ev["y"] == 1)]
        assert np.all(np.diff(t) > 0) and len(t) == per_pixel
    if per_pixel:  # crossings of a linear ramp are evenly spaced in time
        t = ev["t"][(ev["x"] == 0) & (ev["y"] == 0)]
        expect = np.arange(1, per_pixel + 1) * c / abs(d_log) * 1e6
        assert np.allclose(t, expect, atol=2)


def test_static_scene_emits_nothing_and_noise_adds_events():
    flat = np.full((20, 8, 8), 0.4)
    times = np.linspace(0, 1, 20)
    assert len(simulate(flat, times)["t"]) == 0
    assert len(simulate(flat, times, EventConfig(noise_hz=5.0))["t"]) > 0


def test_refractory_period_is_honoured():
    intensity, times = _ramp(3.0, steps=4, size=2)  # many crossings within each 333 ms interval
    free = simulate(intensity, times, EventConfig(c_pos=0.1))
    ref = simulate(intensity, times, EventConfig(c_pos=0.1, refractory_us=50_000))
    assert len(ref["t"]) < len(free["t"])
    for x in range(2):
        t = ref["t"][(ref["x"] == x) & (ref["y"] == 0)]
        assert np.all(np.diff(t) >= 50_000)


def test_npy_roundtrip_and_representations(tmp_path):
    intensity, times = _ramp(0.9, size=4)
    ev = simulate(np.concatenate([intensity, intensity[::-1]]), np.linspace(0, 2, 22))
    save_npy(ev, tmp_path / "ev.npy")
    back = load_npy(tmp_path / "ev.npy")
    for k in ("x", "y", "t", "p"):
        assert np.array_equal(back[k], ev[k])
    imgs = event_images(ev, 4, 4)
    assert imgs.shape == (5, 4, 4, 3)
    # first chunk holds only ON events (the ramp up): red pixels on white
    assert (imgs[0].reshape(-1, 3) == [255, 0, 0]).all(axis=1).any() and not (imgs[0].reshape(-1, 3) == [0, 0, 255]).all(axis=1).any()
    assert (imgs[-1].reshape(-1, 3) == [0, 0, 255]).all(axis=1).any()
    assert histogram(ev, 4, 4).sum() == len(ev["t"])
    vox = voxel_grid(ev, 4, 4, bins=5)
    assert np.isclose(vox.sum(), (ev["p"] > 0).sum() - (ev["p"] == 0).sum(), atol=1e-3)
    np.save(tmp_path / "bad.npy", np.arange(3))
    with pytest.raises(ValueError, match="x, y, t, p"):
        load_npy(tmp_path / "bad.npy")


def test_scenes_are_deterministic_per_seed():
    cfg = WorldConfig()
    a, b = make_scene(cfg, "train", 5), make_scene(cfg, "train", 5)
    assert a == b
    times = render_timeline(cfg)[:4]
    assert np.array_equal(render(cfg, a, times), render(cfg, b, times))
    other = [make_scene(WorldConfig(seed=1), "train", i).signature() for i in range(20)]
    assert other != [make_scene(cfg, "train", i).signature() for i in range(20)]


def test_splits_do_not_overlap_and_novel_holds_unseen_pairs():
    cfg = WorldConfig()
    held = cfg.held_out_pairs()
    assert len(held) == cfg.novel_pairs
    sigs = {s: {make_scene(cfg, s, i).signature() for i in range(150)} for s in SPLITS}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not sigs[s] & sigs[t]
    for s in ("train", "val", "test"):
        for i in range(300):
            assert not {(o.shape, o.colour) for o in make_scene(cfg, s, i).objects} & held
    for i in range(100):
        assert {(o.shape, o.colour) for o in make_scene(cfg, "novel", i).objects} & held
    # every shape and every colour still occurs in training
    seen = {(o.shape, o.colour) for i in range(300) for o in make_scene(cfg, "train", i).objects}
    assert {p[0] for p in seen} == set(cfg.shapes) and {p[1] for p in seen} == set(cfg.colours)


def test_reference_answers_parse_to_the_scene_truth():
    cfg = WorldConfig()
    kinds = set()
    for i in range(120):
        scene = make_scene(cfg, "test", i)
        for qa in questions(scene, seed=i):
            kinds.add(qa.kind)
            assert 7 <= len(qa.answer.split()) <= 50, qa.answer
            if qa.kind == "count":
                assert parse(qa.answer, "count") == NUMBERS[len(scene.objects)]
            elif qa.kind == "direction":
                assert parse(qa.answer, "direction") in {("none" if o.motion == "spin" else o.motion) for o in scene.objects}
            elif qa.kind == "shape":
                assert parse(qa.answer, "shape") in {o.shape for o in scene.objects}
            elif qa.kind == "colour":
                assert parse(qa.answer, "colour") in {o.colour for o in scene.objects}
            elif qa.kind == "speed":
                assert parse(qa.answer, "speed") in {o.speed for o in scene.objects if o.motion != "spin"}
    assert kinds == set(ATTRIBUTES) | {"describe"}
    assert [question_for(make_scene(cfg, "test", i), i).kind for i in range(6)] != ["count"] * 6
    assert parse("The red circle moves slowly to the left", "speed") == "slow"
    assert parse("I do not know", "colour") is None


def test_motion_answers_state_the_rendered_motion_of_the_named_object():
    """Direction and speed answers name the value at once: it must be the named object's (parsed the way eval
    parses answers), and the answer must quote no cells any more."""
    from featspec.xmodal.world.qa import parse, quoted_cells

    cfg = WorldConfig()
    checked = {"direction": 0, "speed": 0}
    for i in range(60):
        scene = make_scene(cfg, "test", i)
        for qa in questions(scene, seed=i, every_object=True):
            if qa.kind not in checked:
                continue
            named = [k for k, o in enumerate(scene.objects) if qa.question.lower().count(o.shape)
                     and (f"{o.colour} {o.shape}" in qa.question or sum(p.shape == o.shape for p in scene.objects) == 1)]
            assert len(named) == 1, qa.question
            o = scene.objects[named[0]]
            want = ("none" if o.motion == "spin" else o.motion) if qa.kind == "direction" else o.speed
            assert parse(qa.answer, qa.kind) == want, qa.answer
            assert quoted_cells(qa.answer) == [] and qa.cells == (), qa.answer
            checked[qa.kind] += 1
    assert min(checked.values()) > 40, checked


def test_quoted_cells_reads_coordinates_in_order():
    from featspec.xmodal.world.qa import quoted_cells

    assert quoted_cells("In Frame 1 the cross is at x 2, y 7, and in Frame 8 it is at x 8, y 7.") == [(2, 7), (8, 7)]
    assert quoted_cells("it is moving right") == []


def test_grounding_answers_quote_the_rendered_cell_of_the_named_frame():
    """"Where is X in frame k?" turns: the cell must be the renderer's centre in video frame k (the frame the
    prompt labels "Frame k:"), and the answer must name that frame the way direction answers do."""
    import re

    from featspec.xmodal.world.qa import grounding
    from featspec.xmodal.world.scenes import object_centres, render_timeline, video_frame_indices

    cfg = WorldConfig()
    times = render_timeline(cfg)[video_frame_indices(len(render_timeline(cfg)))]
    frames_seen = set()
    for i in range(40):
        scene = make_scene(cfg, "train", i)
        truth = object_centres(cfg, scene, times)  # (8, objects, 2)
        for qa in grounding(scene, np.random.default_rng(i), 4):
            k = int(re.search(r"frame (\d)", qa.question).group(1))
            frames_seen.add(k)
            named = [j for j, o in enumerate(scene.objects) if f"{o.colour} {o.shape}" in qa.question
                     or (o.shape in qa.question and sum(p.shape == o.shape for p in scene.objects) == 1)]
            assert len(named) == 1, qa.question
            x, y = truth[k - 1, named[0]]
            assert f"In Frame {k} " in qa.answer, qa.answer
            cell = tuple(int(v) for v in re.search(r"x (\d), y (\d)", qa.answer).groups())
            # frame times are rounded to render ticks, so a centre on a cell border may fall either side
            assert all(abs(c - v * 10 / cfg.size) <= 1.01 for c, v in zip(cell, (x, y))), (qa.answer, x, y)
            assert cell == (min(9, int(x * 10 / cfg.size)), min(9, int(y * 10 / cfg.size))) or k not in (1, 8), qa.answer
    assert frames_seen == set(range(1, 9))


def test_shape_questions_name_the_object_by_colour_when_it_is_unique():
    cfg = WorldConfig()
    for i in range(60):
        scene = make_scene(cfg, "test", i)
        for qa in questions(scene, seed=i, every_object=True):
            if qa.kind == "shape":
                by_colour = [o for o in scene.objects if f"the {o.colour} " in qa.question.lower()]
                if by_colour:  # named by colour: that colour is unique and the answer is its shape
                    assert [p.colour for p in scene.objects].count(by_colour[0].colour) == 1, qa.question
                    assert parse(qa.answer, "shape") == by_colour[0].shape, qa.answer
                else:  # named by motion only when no object of the answer's shape has a unique colour
                    same = [o for o in scene.objects if o.shape == parse(qa.answer, "shape")]
                    assert any([p.colour for p in scene.objects].count(o.colour) > 1 for o in same), qa.question


def test_world_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="unknown colour"):
        WorldConfig(colours=("red", "teal"))
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=4)


def test_lora_merge_keeps_outputs_and_starts_as_identity():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    net[0].q_proj = torch.nn.Linear(8, 8)
    block = torch.nn.Module()
    block.q_proj = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    before = block.q_proj(x)
    assert apply_lora(block, rank=2) == 1
    assert torch.allclose(block.q_proj(x), before)  # B starts at zero
    with torch.no_grad():
        block.q_proj.lora_b.normal_()
    adapted = block.q_proj(x)
    assert set(lora_state(block)) == {"q_proj.lora_a", "q_proj.lora_b"}
    merge_lora(block)
    assert isinstance(block.q_proj, torch.nn.Linear)
    assert torch.allclose(block.q_proj(x), adapted, atol=1e-5)


def test_probe_labels_cover_every_patch_an_object_covers_and_respect_occlusion():
    """A large square at rest, centred on a patch corner, covers the four patches around it; a circle drawn
    on top of it takes the patches it covers most, and positions point at each label's own object."""
    from featspec.xmodal.world.scenes import Scene, SceneObject
    from featspec.xmodal.train.prepare import dense_targets

    cfg = WorldConfig(camera_shake=0.0)
    square = SceneObject("square", "red", "large", "spin", "slow", 32.0, 32.0, 0.0, 0.0)
    alone = Scene("train", 0, (square,), (0.5,) * 9, (0.0, 1.0, 0.0), 0)
    d = dense_targets(cfg, [alone], "video", 16)
    grid = d["shape"][0, 0].reshape(4, 4)
    sq = cfg.shapes.index("square") + 1
    assert (grid[1:3, 1:3] == sq).all() and int((grid > 0).sum()) == 4
    assert torch.allclose(d["offset"][0, 0, 5, 2:], torch.tensor([0.5, 0.5]))
    circle = SceneObject("circle", "blue", "small", "spin", "slow", 24.0, 24.0, 0.0, 0.0)
    both = Scene("train", 1, (square, circle), (0.5,) * 9, (0.0, 1.0, 0.0), 0)
    d = dense_targets(cfg, [both], "video", 16)
    grid = d["shape"][0, 0].reshape(4, 4)
    assert int(grid[1, 1]) == cfg.shapes.index("circle") + 1  # on top where it covers most
    assert int(grid[2, 2]) == sq and int(d["count"][0]) == 1
    assert torch.allclose(d["offset"][0, 0, 5, 2:], torch.tensor([24 / 64, 24 / 64]))
    assert int(d["colour"][0, 0, 5]) == cfg.colours.index("blue") + 1
    events = dense_targets(cfg, [both], "events", 16)
    assert int(events["colour"].max()) == 0 and int(events["shape"].max()) > 0  # events carry no colour
    # motion labels: in place (one past the directions), no speed for objects that do not travel
    from featspec.xmodal.world.scenes import DIRECTIONS

    assert set(d["motion"][0][d["shape"][0] > 0].tolist()) == {len(DIRECTIONS) + 1}
    assert int(d["speed"].max()) == 0 and int(d["motion"][0][d["shape"][0] == 0].max()) == 0
    mover = SceneObject("cross", "green", "large", "up", "fast", 32.0, 40.0, 0.0, 0.0)
    d = dense_targets(cfg, [Scene("train", 2, (mover,), (0.5,) * 9, (0.0, 1.0, 0.0), 0)], "video", 16)
    on = d["shape"][0] > 0
    assert on[0].any() and on[-1].any()
    assert set(d["motion"][0][on].tolist()) == {list(DIRECTIONS).index("up") + 1}
    assert set(d["speed"][0][on].tolist()) == {list(cfg.speeds).index("fast") + 1}


def test_pooled_labels_take_each_patch_from_the_middlemost_image_that_covers_it():
    """EventGPT averages its patch tokens over the 5 images: the drafter's keeper labels each patch once, from
    the image nearest the middle in which an object covers it (the one the average holds most of)."""
    from featspec.xmodal.train.prepare import pooled_over_time

    shape = torch.tensor([[[1, 0, 0], [0, 2, 0], [0, 0, 0], [0, 3, 0], [0, 0, 4]]])  # (1 clip, 5 images, 3 patches)
    t = {"shape": shape, "motion": shape * 10, "offset": shape[..., None].float().expand(-1, -1, -1, 4),
         "count": torch.tensor([2])}
    p = pooled_over_time(t)
    # patch 0: only image 0; patch 1: images 1 and 3 tie for nearness to image 2, the earlier wins; patch 2:
    # only image 4
    assert p["shape"].tolist() == [[[1, 2, 4]]]
    assert p["motion"].tolist() == [[[10, 20, 40]]]
    assert p["offset"].shape == (1, 1, 3, 4) and p["offset"][0, 0, :, 0].tolist() == [1.0, 2.0, 4.0]
    assert p["count"].tolist() == [2]
    empty = pooled_over_time({"shape": torch.zeros(1, 5, 2, dtype=torch.long), "count": torch.tensor([0])})
    assert empty["shape"].tolist() == [[[0, 0]]]
