"""Draft-head checkpoint layouts: save, load, validate, export.

EAGLE-3: the layout vLLM and SGLang load (`LlamaForCausalLMEagle3`): config.json with
num_hidden_layers 1, draft_vocab_size, target_hidden_size when it differs; tensors `fc.weight`,
`midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t` (int64), `t2d` (bool); no embed_tokens.
EAGLE-1: the official EAGLE-1 layout: a LlamaConfig with one layer; tensors `fc.weight`, `fc.bias`,
`layers.0.*` (no input_layernorm); weights as model.safetensors (pytorch_model.bin also read).
featspec's own extras live under the config key "featspec" (fusion layers, target layer count) and
are optional when loading third-party heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featspec.errors import FeatspecError
from featspec.io import atomic_dir_write
from featspec.heads.base import DraftHead
from featspec.heads.block import BlockHead
from featspec.heads.eagle1 import Eagle1Head
from featspec.heads.eagle3 import Eagle3Head, default_layer_ids
from featspec.heads.layers import HeadConfig

EAGLE3_ARCH = "LlamaForCausalLMEagle3"
BLOCK_ARCH = "FeatspecBlockDrafter"  # featspec's own: no engine loads it under this name
STRIP_PREFIXES = ("model.", "module.", "draft_model.", "eagle.")


ENGINES = ("vllm", "sglang", "speculators")


def head_config_json(head: DraftHead, dtype: str = "bfloat16", extra: dict | None = None, engine: str = "vllm",
                     verifier: str | None = None) -> dict:
    """config.json of `head` for `engine`, with its layer ids in the meaning that engine reads (docs/export.md):
    vllm (also featspec's own layout, and what llama.cpp's converter reads): top-level
    `eagle_aux_hidden_state_layer_ids` = featspec's ids (input of layer k); sglang: under `eagle_config`, minus
    one (SGLang adds one); speculators: vllm's keys nested the speculators way. Default layers are left out."""
    if engine not in ENGINES:
        raise FeatspecError(f"unknown engine layout '{engine}': use one of {', '.join(ENGINES)}")
    c = head.cfg
    cfg = {
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bias": isinstance(head, Eagle1Head),
    }
    fs = {"kind": head.kind, "target_num_layers": c.target_num_layers}
    if isinstance(head, Eagle3Head):
        # a block head is featspec's own layout: naming it an EAGLE-3 architecture would let an engine load it as
        # one and ignore its mask slots (docs/block.md: what vLLM's DFlash drafters expect instead)
        cfg["architectures"] = [BLOCK_ARCH if isinstance(head, BlockHead) else EAGLE3_ARCH]
        if isinstance(head, BlockHead):
            fs["block_size"] = head.block_size
            fs["chain"] = head.chain
        cfg["draft_vocab_size"] = c.draft_vocab_size
        cfg["norm_before_residual"] = c.norm_before_residual
        if c.target_hidden_size and c.target_hidden_size != c.hidden_size:
            cfg["target_hidden_size"] = c.target_hidden_size
        fs["layer_ids"] = list(head.layer_ids)
        # default layers stay implicit: every engine's default is featspec's (2, L//2, L-3), and an explicit
        # SGLang id would be read one layer off by vLLM, which also reads eagle_config as is
        if tuple(head.layer_ids) != default_layer_ids(c.target_num_layers):
            if engine != "sglang":
                cfg["eagle_aux_hidden_state_layer_ids"] = list(head.layer_ids)
            else:
                cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in head.layer_ids],
                                       "use_aux_hidden_state": True}
    else:
        cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["featspec"] = {**fs, **(extra or {})}
    if engine == "speculators":
        return speculators_config(cfg, verifier)
    return cfg


SPECULATORS_TOP = ("draft_vocab_size", "norm_before_residual", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                   "featspec", "torch_dtype")


def speculators_config(flat: dict, verifier: str | None, tokens: int = 3) -> dict:
    """The speculators layout (what `speculators` loads and vLLM's `configs/speculators` reads): EAGLE-3 keys at
    the top, the decoder layer under `transformer_layer_config`, the proposal and verifier under
    `speculators_config`. norm_before_residual is always written: vLLM defaults it to True when absent."""
    if not verifier:
        raise FeatspecError("--format speculators names the verifier (the target): pass --target")
    layer = {k: v for k, v in flat.items() if k not in SPECULATORS_TOP + ("architectures", "bias")}
    out = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
           "transformer_layer_config": layer, **{k: flat[k] for k in SPECULATORS_TOP if k in flat}}
    out["speculators_config"] = {
        "algorithm": "eagle3",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens, "verifier_accept_k": 1,
                              "accept_tolerance": 0.0}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
    }
    return out


def head_tensors(head: DraftHead, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in head.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.to(dtype) if v.is_floating_point() else v.clone()
    return out


def save_head(head: DraftHead, out: Path, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None,
              card: str | None = None, engine: str = "vllm", verifier: str | None = None) -> None:
    """Save `head` in an engine layout (EAGLE-3: vllm, the default and featspec's own, sglang or speculators;
    EAGLE-1: official EAGLE)."""
    tensors = head_tensors(head, dtype)
    cfg = head_config_json(head, str(dtype).replace("torch.", ""), extra, engine, verifier)
    if engine == "speculators":
        tensors = _renamed(tensors, "midlayer.", "layers.0.")

    def write(d: Path) -> None:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if card:
            (d / "README.md").write_text(card)

    atomic_dir_write(Path(out), write)


def _renamed(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Tensor names with the prefix `old` swapped for `new` (the decoder layer's name differs by layout)."""
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        file = path / "model.safetensors"
        load = lambda: load_file(str(file))  # noqa: E731
    elif (path / "pytorch_model.bin").exists():
        file = path / "pytorch_model.bin"
        load = lambda: torch.load(file, map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise FeatspecError(f"{path} has no model.safetensors or pytorch_model.bin: point --head at a head directory")
    try:
        tensors = load()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and OS errors all mean the same to the user
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise FeatspecError(f"{file} is not a readable weights file ({detail}): re-export or re-download the head") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise FeatspecError(f"{file} does not hold a flat dict of tensors: not a head checkpoint")
    clean = {}
    for k, v in tensors.items():
        for p in STRIP_PREFIXES:
            if k.startswith(p) and not k.startswith("midlayer"):
                k = k[len(p):]
        clean[k] = v
    clean.pop("embed_tokens.weight", None)  # shared with the target
    return clean


# keys a head's config.json must hold, and their types (bool is not an int here)
REQUIRED_KEYS = {"hidden_size": int, "intermediate_size": int, "num_attention_heads": int, "vocab_size": int}
NUMERIC_KEYS = ("num_key_value_heads", "head_dim", "draft_vocab_size", "target_hidden_size", "rms_norm_eps", "rope_theta")


def read_head_config(path: Path) -> dict:
    """A head's config.json as a dict with the keys and types loading needs, or one line saying what is wrong."""
    from featspec.validate import read_text

    file = path / "config.json"
    if not file.exists():
        raise FeatspecError(f"{path} has no config.json: not a head directory")
    try:
        cfg = json.loads(read_text(file, "head config"))
    except json.JSONDecodeError as exc:
        raise FeatspecError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}): re-export the head") from None
    if not isinstance(cfg, dict):
        raise FeatspecError(f"{file} holds a JSON {type(cfg).__name__}, not an object: not a head config")
    if "speculators_model_type" in cfg:
        cfg = flatten_speculators(cfg, file)
    for key, kind in REQUIRED_KEYS.items():
        value = cfg.get(key)
        if value is None:
            raise FeatspecError(f"{file} lacks {key}: not a complete head config (re-export the head)")
        if not isinstance(value, kind) or isinstance(value, bool) or value < 1:
            raise FeatspecError(f"{file}: {key} is {value!r}, expected a positive integer")
    for key in NUMERIC_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FeatspecError(f"{file}: {key} is {value!r}, expected a number")
    for key in ("featspec", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise FeatspecError(f"{file}: {key} is {cfg[key]!r}, expected an object")
    return cfg


def flatten_speculators(cfg: dict, file: Path) -> dict:
    """A speculators config (`speculators_model_type`, nested `transformer_layer_config`) read as the flat
    layout: the decoder layer's keys, then the EAGLE-3 keys at the top."""
    if cfg.get("speculators_model_type") != "eagle3":
        raise FeatspecError(f"{file}: speculators model type {cfg.get('speculators_model_type')!r} is not supported "
                            "(featspec drafts with eagle3 speculators)")
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise FeatspecError(f"{file}: transformer_layer_config must be an object")
    flat = {**layer, **{k: v for k, v in cfg.items() if k not in ("transformer_layer_config", "architectures")}}
    flat["architectures"] = [EAGLE3_ARCH]
    flat["_layout"] = "speculators"
    return flat


def resolve_head_dir(spec: str) -> Path:
    """A local head directory, or a hub id fetched with huggingface_hub (needs a network)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure is the same advice to the user
            raise FeatspecError(f"could not fetch head '{spec}' ({type(exc).__name__}): check the id and the network, "
                                "or pass a local directory") from None
    raise FeatspecError(f"head '{spec}' not found: pass a head directory (config.json + model.safetensors) or a hub id")


def layer_ids_from_engine_config(cfg: dict) -> list[int] | None:
    """A third-party head's layer ids in featspec's meaning (HF hidden_states indices), from the keys the engines
    read (docs/export.md): a top-level `eagle_aux_hidden_state_layer_ids` is vLLM's, speculators' and llama.cpp's
    (id k = the input of layer k: the same meaning); SGLang reads it only under `eagle_config` and adds 1."""
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    if ids:
        return ids
    eagle = cfg.get("eagle_config")
    nested = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
    if isinstance(nested, list) and nested and all(isinstance(i, int) for i in nested):
        return [i + 1 for i in nested]
    return nested or None  # anything else is left for load_head's check of the ids to refuse


def load_head(spec: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DraftHead:
    """Load an EAGLE-1 or EAGLE-3 head from a directory or hub id; checks keys and shapes."""
    path = resolve_head_dir(str(spec))
    cfg = read_head_config(path)
    tensors = _read_tensors(path)
    if cfg.get("_layout") == "speculators":  # speculators names the decoder layer layers.0, vLLM/SGLang midlayer
        tensors = _renamed(tensors, "layers.0.", "midlayer.")
    fs = cfg.get("featspec") or {}
    is3 = EAGLE3_ARCH in (cfg.get("architectures") or []) or "midlayer.self_attn.q_proj.weight" in tensors
    block = fs.get("kind") == "block" or BLOCK_ARCH in (cfg.get("architectures") or [])
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    if is3:
        th = cfg.get("target_hidden_size") or hidden
        n_fused = tensors["fc.weight"].shape[1] // th if "fc.weight" in tensors else 3
    hc = HeadConfig(
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        vocab_size=cfg["vocab_size"],
        draft_vocab_size=int(cfg.get("draft_vocab_size") or (cfg["vocab_size"] if is3 else 0)),
        target_hidden_size=int(cfg.get("target_hidden_size") or hidden),
        target_num_layers=int(fs.get("target_num_layers") or 0),
        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
    )
    if is3:
        ids = fs.get("layer_ids", layer_ids_from_engine_config(cfg))
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                      and i >= 0 for i in ids)):
            raise FeatspecError(f"{path}/config.json: layer ids {ids!r} must be a list of non-negative integers")
        if ids is not None and len(ids) != n_fused:
            raise FeatspecError(f"{path}: fc reads {n_fused} layers but the config lists {len(ids)} layer ids")
        if block:
            slots = tensors.get("mask_feat")
            if slots is None or slots.dim() != 2:
                raise FeatspecError(f"{path} lacks mask_feat: not a complete block head (re-export it)")
            chain = fs.get("chain", False)  # heads from before chained slots name none
            if not isinstance(chain, bool):
                raise FeatspecError(f"{path}/config.json: featspec.chain must be true or false, got {chain!r}")
            head: DraftHead = BlockHead(hc, tuple(ids) if ids else None, num_fused=n_fused,
                                        block_size=slots.shape[0] + 1, chain=chain)
        else:
            head = Eagle3Head(hc, tuple(ids) if ids else None, num_fused=n_fused)
        if "d2t" not in tensors or "t2d" not in tensors:
            raise FeatspecError(f"{path} lacks d2t/t2d: not a complete EAGLE-3 head (re-export it)")
    else:
        head = Eagle1Head(hc)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise FeatspecError(f"{path}: head tensors do not match the {head.kind} layout (missing {missing[:4]}, "
                            f"unexpected {extra[:4]})")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise FeatspecError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise FeatspecError(f"{path}: tensor {bad} holds NaN or inf values: the head is broken (a diverged run?); "
                            "use an earlier checkpoint")
    head.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()})
    head.stored_dtype = str(tensors["fc.weight"].dtype).replace("torch.", "")
    head._source = str(path)
    head.record = dict(fs)  # what featspec recorded about the head (training, evals): carried over by export
    return head.to(device=device, dtype=dtype) if dtype is not None else head.to(device)


def validate_against(head: DraftHead, target_cfg, spec: str = "target") -> None:
    """One-line error when the head was built for a different target; fills in unknown fusion layers."""
    c = head.cfg
    th = c.target_hidden_size or c.hidden_size
    if th != target_cfg.hidden_size:
        raise FeatspecError(f"head expects target hidden size {th} but {spec} has {target_cfg.hidden_size}: "
                            "use a head trained for this target")
    if c.vocab_size != target_cfg.vocab_size:
        raise FeatspecError(f"head expects vocabulary {c.vocab_size} but {spec} has {target_cfg.vocab_size}: "
                            "use a head trained for this target")
    layers = target_cfg.num_hidden_layers
    if c.target_num_layers and c.target_num_layers != layers:
        raise FeatspecError(f"head was trained on a target with {c.target_num_layers} layers but {spec} has {layers}: "
                            "use a head trained for this target")
    c.target_num_layers = layers
    if isinstance(head, Eagle3Head):
        if not head.layer_ids:
            head._layer_ids = default_layer_ids(layers)
        if max(head.layer_ids) > layers:
            raise FeatspecError(f"head reads hidden state {max(head.layer_ids)} but {spec} has only {layers} layers")
        if int(head.t2d.sum()) != c.draft_vocab_size or int(head.draft_ids.max()) >= c.vocab_size:
            raise FeatspecError("head's d2t/t2d are inconsistent with its draft vocabulary: re-export the head")


def export_head(src: str, fmt: str, out: Path, dtype: str | None = None, verifier: str | None = None) -> dict:
    """Write a checked copy of a head for vLLM, SGLang or speculators, in its stored dtype unless `dtype` is
    given; returns a summary."""
    if fmt not in ENGINES:
        raise FeatspecError(f"unknown format '{fmt}': use one of {', '.join(ENGINES)}")
    head = load_head(src, dtype=None)
    if isinstance(head, BlockHead):
        raise FeatspecError(f"{src} is a block head, which no serving engine loads: vLLM's DFlash drafters inject the "
                            "target's features as context K/V into their own decoder layers, this head reads "
                            "[embedding, feature] at every query (docs/block.md)")
    if fmt != "vllm" and not isinstance(head, Eagle3Head):
        raise FeatspecError(f"--format {fmt} holds EAGLE-3 heads; {src} is an {head.kind} head (use --format vllm)")
    out_dtype = getattr(torch, dtype or head.stored_dtype)
    save_head(head, out, dtype=out_dtype, engine=fmt, verifier=verifier,
              extra={k: v for k, v in head.record.items() if k not in ("kind", "target_num_layers", "layer_ids")})
    reloaded = load_head(out, dtype=None)
    if isinstance(head, Eagle3Head) and tuple(reloaded.layer_ids) != tuple(head.layer_ids):
        raise FeatspecError(f"export check failed: layer ids {reloaded.layer_ids} read back, {head.layer_ids} written")
    for (k, a), (_, b) in zip(head.state_dict().items(), reloaded.state_dict().items()):
        if not torch.equal(a.to(out_dtype) if a.is_floating_point() else a, b.to(out_dtype) if b.is_floating_point() else b):
            raise FeatspecError(f"export check failed: tensor {k} changed on reload")
    return {"kind": head.kind, "format": fmt, "tensors": len(head.state_dict()), "out": str(out),
            "dtype": str(out_dtype).replace("torch.", "")}
