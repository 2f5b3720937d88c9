"""The one training loop (train/loop.py): accumulation, clipping, schedule, atomic checkpoints, exact resume."""

from __future__ import annotations

import pytest
import torch

from featspec.train.loop import Loop, find_checkpoint, read_checkpoint, warmup_cosine


def _setup(tmp_path, accumulation: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 8))
    loop = Loop(opt, sched, model.parameters, total=8, accumulation=accumulation, clip=1.0, ckpt=tmp_path / "ckpt",
                save_every=3, state=lambda: {"model": model.state_dict()}, progress=False, meta={"seen": []})
    return model, loop


def _micro(model, loop):
    def step(micro: int):
        g = torch.Generator().manual_seed(micro)  # data from the micro-batch index, as every trainer derives it
        x = torch.randn(3, 4, generator=g)
        loop.meta["seen"].append(micro)
        return ((model(x) - x.sum(-1, keepdim=True)) ** 2).mean(), {}

    return step


def test_schedule_warms_up_then_decays_to_the_floor():
    f = warmup_cosine(4, 20, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


def test_resume_continues_exactly_where_a_killed_run_stopped(tmp_path):
    full, loop = _setup(tmp_path / "a")
    loop.run(_micro(full, loop))
    assert loop.meta["step"] == 8 and loop.meta["micro"] == 16 and loop.meta["seen"] == list(range(16))

    part, loop = _setup(tmp_path / "b")
    loop.run(_micro(part, loop), stop_at=5)  # checkpoints at steps 3 and 5, as a kill after step 5 leaves them
    assert read_checkpoint(tmp_path / "b" / "ckpt")["meta"]["step"] == 5
    again, loop = _setup(tmp_path / "b")
    loop.resume(lambda blob: again.load_state_dict(blob["model"]))
    assert loop.meta["step"] == 5 and loop.meta["micro"] == 10
    loop.run(_micro(again, loop))
    for a, b in zip(full.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loop.meta["seen"] == list(range(16))  # every micro-batch once, in order, across the resume


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, loop = _setup(tmp_path)
    loop.run(_micro(model, loop), stop_at=3)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        loop.save()
    assert read_checkpoint(tmp_path / "ckpt")["meta"]["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp directory left behind


def test_no_checkpoint_means_nothing_to_resume(tmp_path):
    model, loop = _setup(tmp_path)
    assert loop.resume() is None and find_checkpoint(tmp_path / "ckpt") is None
