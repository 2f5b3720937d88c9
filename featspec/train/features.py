"""`featspec train --cache-features DIR`: the frozen target's features computed once and kept on disk.

Online features cost one target forward per micro-batch in every epoch; with the cache, the target runs
once per example (the first pass fills DIR) and later epochs, resumed runs and reruns with other head
settings only read files. One file per example holds the head's input hidden states and the final
hidden state at the example's own length (no padding), in the run's dtype. DIR is keyed by target,
dtype, layer ids and the examples: a cache of other data is refused, not silently reused. Files are
written to a temp name and renamed, so a killed fill resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from featspec.errors import FeatspecError
from featspec.io import torch_save, write_text
from featspec.train.data import Example, collate
from featspec.train.losses import TargetBatch, target_batch


def cache_key(target_spec: str, dtype: str, layer_ids: tuple[int, ...], examples: list[Example]) -> str:
    digest = hashlib.sha1()
    for ex in examples:
        digest.update(json.dumps(ex.ids).encode())
    return json.dumps({"target": target_spec, "dtype": dtype, "layer_ids": list(layer_ids),
                       "examples": len(examples), "ids_sha1": digest.hexdigest()}, sort_keys=True)


def estimate_bytes(examples: list[Example], n_states: int, hidden: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(len(e.ids) for e in examples) * n_states * hidden * itemsize


def open_cache(path: Path, key: str, need_bytes: int) -> Path:
    """Create or reopen DIR for `key`; refuse a DIR made for other data, or a disk without room."""
    path.mkdir(parents=True, exist_ok=True)
    key_file = path / "key.json"
    if key_file.exists():
        if key_file.read_text() != key:
            raise FeatspecError(f"--cache-features {path} holds features of other data or another target: "
                                "choose an empty directory")
        return path
    if any(path.glob("*.pt")):
        raise FeatspecError(f"--cache-features {path} holds feature files but no key.json: choose an empty directory")
    free = shutil.disk_usage(path).free
    if need_bytes > free:
        raise FeatspecError(f"--cache-features {path} needs ~{need_bytes / 1e9:.1f} GB but {free / 1e9:.1f} GB are free: "
                            "choose another directory or fewer --max-conversations")
    write_text(key, key_file)
    return path


@torch.no_grad()
def fill_cache(path: Path, target: torch.nn.Module, head, examples: list[Example], pad_id: int, device,
               dtype: torch.dtype, autocast) -> None:
    """Run the target once over every example that has no file yet."""
    todo = [i for i in range(len(examples)) if not (path / f"{i}.pt").exists()]
    for i in tqdm(todo, desc="cache features", unit="conv", dynamic_ncols=True, disable=not todo):
        batch = {k: v.to(device) for k, v in collate([examples[i]], pad_id).items()}
        with autocast():
            tb = target_batch(target, head, batch)
        blob = {"hidden": [h[0].to("cpu", dtype).clone() for h in tb.hidden], "last": tb.last[0].to("cpu", dtype).clone()}
        torch_save(blob, path / f"{i}.pt")


def cached_batch(path: Path, batch: dict[str, torch.Tensor], indices: list[int]) -> TargetBatch:
    """The TargetBatch the online forward would give for this collated batch of examples `indices`
    (features right-padded with zeros to the batch's width)."""
    width, device = batch["input_ids"].shape[1], batch["input_ids"].device
    blobs = [torch.load(path / f"{i}.pt", map_location="cpu") for i in indices]

    def stack(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows]).to(device)

    hidden = [stack([b["hidden"][j] for b in blobs]) for j in range(len(blobs[0]["hidden"]))]
    return TargetBatch(hidden, stack([b["last"] for b in blobs]), batch["input_ids"], batch["loss_mask"])
