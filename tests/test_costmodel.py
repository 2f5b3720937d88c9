"""The machine's cost model: curves per context, the cache and its key, predictions and the dtype choice."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, llama_config

from featspec.drafters import cost as costmodel
from featspec.drafters.cost import CostModel, choose_dtype, cost_model, predict, prior_nodes
from featspec.models.target import TargetModel


def synthetic(seconds_by_context: list[list[float]], sizes=(1, 2, 4, 8, 16, 32, 64), contexts=(64, 256, 1024)) -> CostModel:
    return CostModel({"dtype": "x"}, list(contexts), list(sizes), seconds_by_context)


def test_curve_interpolates_between_contexts_and_clamps():
    cm = synthetic([[1.0] * 7, [2.0] * 7, [4.0] * 7])
    assert cm.curve(64)(1) == pytest.approx(1.0)
    assert cm.curve(160)(1) == pytest.approx(1.5)  # halfway between 64 and 256
    assert cm.curve(10)(8) == pytest.approx(1.0) and cm.curve(5000)(8) == pytest.approx(4.0)


def test_prediction_follows_the_cost_curve():
    """A flat curve (GPU- or AMX-like) buys a big tree; a steep one (emulated bf16) says plain decoding wins."""
    flat = synthetic([[1.0, 1.0, 1.0, 1.02, 1.05, 1.1, 1.3]] * 3)
    steep = synthetic([[1.0, 1.9, 3.7, 7.0, 14.0, 28.0, 56.0]] * 3)
    good = predict(flat, 256, {"base_s": 0.05, "level_s": 0.02})
    assert good.nodes >= 8 and good.speedup > 1.5
    bad = predict(steep, 256, {"base_s": 0.05, "level_s": 0.02})
    assert bad.nodes == 0 and bad.speedup == pytest.approx(1.0)
    # the prior: nodes best first, a child never above its parent's probability
    nodes = prior_nodes()
    assert all(a[0] >= b[0] for a, b in zip(nodes, nodes[1:]))
    assert nodes[0] == (costmodel.RANK_ACCEPT[0], 1)


def test_cost_model_is_cached_under_a_key_of_what_changes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path))
    model = build_model(llama_config(), seed=0)
    target = TargetModel(model)
    calls = []
    real = costmodel.measure_verify

    def counting(target, *_, **k):
        calls.append(1)
        return real(target, contexts=(16, 32), sizes=(1, 2, 4), progress=False)

    monkeypatch.setattr(costmodel, "measure_verify", counting)
    first = cost_model(target, progress=False)
    again = cost_model(target, progress=False)
    assert len(calls) == 1 and again.seconds == first.seconds and first.path.exists()
    data = json.loads(first.path.read_text())
    for field in ("weights", "dtype", "device", "cpu_capability", "threads", "torch"):
        assert field in data["key"], field
    assert data["key"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # other weights, another dtype or thread count: another file, measured anew
    other = build_model(llama_config(), seed=1)
    assert cost_model(TargetModel(other), progress=False).path != first.path
    bf16 = TargetModel(build_model(llama_config(), seed=0).to(torch.bfloat16))
    assert cost_model(bf16, progress=False).path != first.path
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
        assert cost_model(target, progress=False).path != first.path
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4
    first.path.write_text("{ damaged")  # a damaged file is measured again, not a traceback
    assert cost_model(target, progress=False).seconds and len(calls) == 5


def test_measured_curve_is_sane(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path))
    target = TargetModel(build_model(llama_config(), seed=0))
    cs, ss, secs = costmodel.measure_verify(target, contexts=(16, 48), sizes=(1, 4, 16), repeats=2, progress=False)
    assert cs == [16, 48] and ss == [1, 4, 16]
    assert all(t > 0 for row in secs for t in row)
    assert target.length == 48 and target.cache.get_seq_length() == 48  # every timed verify rolled back


def test_choose_dtype_picks_the_faster_prediction(monkeypatch):
    """bf16 wins where its curve is cheaper (native), fp32 where bf16 is emulated; the reason says why."""
    model = build_model(llama_config(), seed=0)

    def fake(costs_by_dtype):
        def cost(target, **_):
            return synthetic([costs_by_dtype[target.dtype]] * 3)
        return cost

    native = {torch.float32: [2.0, 2.1, 2.2, 2.6, 3.5, 5.0, 8.0], torch.bfloat16: [1.0, 1.0, 1.05, 1.1, 1.3, 1.6, 2.2]}
    monkeypatch.setattr(costmodel, "cost_model", fake(native))
    dtype, reason, preds = choose_dtype(model)
    assert dtype == torch.bfloat16 and reason.startswith("bfloat16") and set(preds) == {"float32", "bfloat16"}
    emulated = {torch.float32: [1.0, 1.1, 1.2, 1.5, 2.2, 3.5, 6.0], torch.bfloat16: [2.5, 4.0, 7.0, 13.0, 25.0, 50.0, 99.0]}
    monkeypatch.setattr(costmodel, "cost_model", fake(emulated))
    dtype, reason, _ = choose_dtype(model)
    assert dtype == torch.float32 and "float32" in reason.split(":")[0]
    assert next(model.parameters()).dtype == torch.float32  # the float32 model is measured as is, never cast
