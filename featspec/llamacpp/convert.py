"""Models and heads as GGUF files llama.cpp loads, through llama.cpp's own converter.

Why the converter and not a writer of our own: it is the reference for llama.cpp's layout (tensor names, the
`eagle3.*` keys) and for the tokenizer block a draft GGUF carries (pre-tokenizer detection, special tokens);
the PyPI `gguf` package (0.19) does not know the `eagle3` architecture yet. featspec's part is to hand the
converter a head whose layer ids mean what llama.cpp reads, and to check what it wrote.

Layer ids: llama.cpp's EAGLE-3 loader reads `eagle3.target_layers` id k as the input of target layer k
(`t_layer_inp[k]`, id == n_layer is the last layer's output): exactly HF `hidden_states[k]`, which is what a
featspec head's `layer_ids` are. Its converter copies `eagle_aux_hidden_state_layer_ids` into that key as is,
so the converter's input always carries the head's ids explicitly. (The vLLM export writes ids shifted by one
for vLLM's meaning; converting that directory would read the wrong layers for a non-default head.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from featspec.errors import FeatspecError
from featspec.io import atomic_write, cache_root
from featspec.llamacpp.source import version

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "f32": "f32", "bf16": "bf16"}
HEAD_TENSORS = 14  # fc, 10 decoder-layer tensors, output norm, lm_head (output), d2t: t2d is not written


def outtype(dtype: str) -> str:
    try:
        return OUTTYPES[dtype.replace("torch.", "")]
    except KeyError:
        raise FeatspecError(f"llama.cpp conversion supports float32 and bfloat16, not {dtype}") from None


def _run_converter(tree: Path, src: Path, out: Path, kind: str, target_dir: Path | None = None) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with its own gguf-py) through the atomic writer."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}

    def convert(tmp: Path) -> None:
        cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outfile", str(tmp), "--outtype", kind]
        if target_dir is not None:
            cmd += ["--target-model-dir", str(target_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            hint = " (pip install sentencepiece)" if "sentencepiece" in tail else ""
            raise FeatspecError(f"llama.cpp's converter failed on {src}{hint}: {tail}")

    atomic_write(out, convert)


def dir_key(path: Path) -> str:
    """Content key of a model directory: names, sizes and mtimes of its files (hashing GBs would be slow)."""
    h = hashlib.sha1()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def cached_gguf(name: str, sources: list[Path], kind: str, tree: Path, make: Callable[[Path], None]) -> Path:
    """A GGUF converted once per (source directories' contents, tensor type, llama.cpp), kept in the cache."""
    parts = " ".join(dir_key(s) for s in sources)
    key = hashlib.sha1(f"{parts} {kind} {version(tree)}".encode()).hexdigest()[:16]
    out = cache_root() / "llamacpp" / "gguf" / f"{name}-{kind}-{key}.gguf"
    if not out.exists():
        print(f"featspec: converting {sources[0]} to GGUF ({kind}) for llama.cpp, once (cached at {out})",
              file=sys.stderr, flush=True)
        make(out)
    return out


def target_gguf(tree: Path, target_dir: Path, dtype: str) -> Path:
    """The target converted once per (weights, dtype, llama.cpp)."""
    kind = outtype(dtype)
    return cached_gguf(Path(target_dir).name, [Path(target_dir)], kind, tree,
                       lambda out: _run_converter(tree, Path(target_dir), out, kind))


def converter_config(cfg: dict, layer_ids: list[int]) -> dict:
    """The head's config as llama.cpp's converter should read it: explicit layer ids in llama.cpp's meaning."""
    out = {k: v for k, v in cfg.items() if k != "featspec"}
    out["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in layer_ids]
    return out


def export_gguf(head_spec: str, target_dir: Path, tree: Path, out: Path, dtype: str | None = None) -> dict:
    """Write `head_spec` (an EAGLE-3 head) as the draft GGUF `llama-server --spec-type draft-eagle3` loads, in
    `dtype` (default: the head's stored dtype), then check the written metadata against the head."""
    from transformers import AutoConfig

    from featspec.heads.checkpoint import head_config_json, head_tensors, load_head, validate_against
    from featspec.heads.eagle3 import Eagle3Head

    head = load_head(head_spec, dtype=None)
    if not isinstance(head, Eagle3Head):
        raise FeatspecError(f"{head_spec} holds an {head.kind} head: llama.cpp drafts with EAGLE-3 heads only "
                            "(--spec-type draft-eagle3); train one with `featspec train --method eagle3`")
    target_cfg = AutoConfig.from_pretrained(str(target_dir)).get_text_config()
    validate_against(head, target_cfg, str(target_dir))
    if len(head.layer_ids) != 3:
        raise FeatspecError(f"llama.cpp's EAGLE-3 reads exactly 3 target layers; this head fuses {len(head.layer_ids)}")
    kind = outtype(dtype or head.stored_dtype)
    import torch
    from safetensors.torch import save_file

    torch_dtype = torch.float32 if kind == "f32" else torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="featspec-gguf-") as tmp:
        src = Path(tmp)
        cfg = converter_config(head_config_json(head, str(torch_dtype).replace("torch.", "")), list(head.layer_ids))
        save_file(head_tensors(head, torch_dtype), str(src / "model.safetensors"), metadata={"format": "pt"})
        (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _run_converter(tree, src, Path(out), kind, target_dir=Path(target_dir))
    meta = read_eagle3_metadata(Path(out))
    problems = check_eagle3_metadata(meta, list(head.layer_ids), head.cfg.target_hidden_size or head.cfg.hidden_size)
    if problems:
        Path(out).unlink(missing_ok=True)
        raise FeatspecError(f"llama.cpp's converter wrote a head llama.cpp would misread ({'; '.join(problems)}): "
                            "this llama.cpp is not supported; use the pinned one (make llamacpp)")
    return {"out": str(out), "layer_ids": meta["target_layers"], "tensors": meta["tensors"], "outtype": kind}


def read_eagle3_metadata(path: Path) -> dict:
    """What llama.cpp will read from a draft GGUF: architecture, target layers, target hidden size, tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise FeatspecError(f"{path} is not a readable GGUF file ({exc})") from None

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        parts = [field.parts[i].tolist() for i in field.data]
        if field.types and field.types[0].name == "STRING":
            return bytes(field.parts[field.data[0]]).decode()
        flat = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in parts]
        return flat if len(flat) != 1 or field.types[0].name == "ARRAY" else flat[0]

    arch = value("general.architecture")
    return {
        "architecture": arch,
        "target_layers": value(f"{arch}.target_layers"),
        "target_hidden_size": value(f"{arch}.target_hidden_size"),
        "tensors": {t.name: [int(d) for d in t.shape] for t in reader.tensors},
    }


def check_eagle3_metadata(meta: dict, layer_ids: list[int], target_hidden: int) -> list[str]:
    """Ways a written draft GGUF disagrees with the head it came from (empty when llama.cpp reads it right)."""
    problems = []
    if meta["architecture"] != "eagle3":
        problems.append(f"architecture {meta['architecture']!r}, expected 'eagle3'")
    if list(meta["target_layers"] or []) != list(layer_ids):
        problems.append(f"target_layers {meta['target_layers']}, the head reads {list(layer_ids)}")
    if meta["target_hidden_size"] not in (None, target_hidden):
        problems.append(f"target_hidden_size {meta['target_hidden_size']}, expected {target_hidden}")
    if len(meta["tensors"]) != HEAD_TENSORS:
        problems.append(f"{len(meta['tensors'])} tensors, expected {HEAD_TENSORS}")
    return problems
