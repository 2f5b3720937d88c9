"""`--regenerate`: let the target answer the ShareGPT prompts itself, so a head learns the target's
own text (where the target is confident, as it is when it generates) rather than another model's.

The first user turn of each conversation is answered greedily in batches with left padding.
Conversations are taken in the order given (sorted by prompt length only within windows of a few
batches, to limit padding), so a stopped run has answered a prefix of the list: a later run with
`--max-conversations` up to that prefix regenerates nothing. Answers are appended to a JSONL file per
batch, so an interrupted run resumes where it stopped; the file is keyed by target and answer length
limit, its rows by conversation id.

featspec ships the answers it regenerated for its default target (`featspec/assets/regenerated`, gzip'd
JSONL in the same format): they are read as if they were in the cache, so a fresh machine trains on
them without regenerating them (about 1.1 s per answer here). Rows in the cache take precedence.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tqdm import tqdm

from featspec.models.registry import cache_root

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "regenerated"


def _name(target_spec: str, max_new_tokens: int) -> str:
    return f"{target_spec.replace('/', '--')}-max{max_new_tokens}.jsonl"


def regenerated_path(target_spec: str, max_new_tokens: int) -> Path:
    """One file per (target, length limit), rows keyed by conversation id: a run over more conversations
    reuses every answer an earlier run wrote."""
    return cache_root() / "regenerated" / _name(target_spec, max_new_tokens)


def shipped_path(target_spec: str, max_new_tokens: int) -> Path:
    """Where the repository keeps answers regenerated for this target, if it ships any."""
    return SHIPPED / (_name(target_spec, max_new_tokens) + ".gz")


def _rows(text: str) -> dict[str, list[dict[str, str]]]:
    out = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: regenerate that conversation again
        out[row["id"]] = row["messages"]
    return out


def _done(path: Path, shipped: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """Answers already made: the shipped ones, overridden by the cache's."""
    out = _rows(gzip.decompress(shipped.read_bytes()).decode()) if shipped is not None and shipped.exists() else {}
    if path.exists():
        out.update(_rows(path.read_text()))
    return out


def regenerate(lm, convs: list[tuple[str, str]], max_new_tokens: int = 320, batch_size: int = 64,
               max_prompt_tokens: int = 512, window_batches: int = 4) -> list[tuple[str, list[dict[str, str]]]]:
    """(conversation id, first user turn) -> (id, [user, target's greedy answer]), cached on disk."""
    from featspec.models.tokens import encode_messages

    path = regenerated_path(lm.spec, max_new_tokens)
    done = _done(path, shipped_path(lm.spec, max_new_tokens))
    todo = []
    for cid, text in convs:
        if cid in done:
            continue
        ids = encode_messages(lm.tokenizer, [{"role": "user", "content": text}])
        if len(ids) <= max_prompt_tokens:
            todo.append((cid, text, ids))
    if todo:  # with everything answered already (cache or shipped) the model is not touched
        window = batch_size * window_batches  # large batches pay on a CPU too (measurements in docs/eagle.md)
        todo = [r for i in range(0, len(todo), window) for r in sorted(todo[i : i + window], key=lambda r: len(r[2]))]
        done.update(_answer(lm, todo, path, max_new_tokens, batch_size))
    return [(cid, done[cid]) for cid, _ in convs if cid in done]


@torch.inference_mode()
def _answer(lm, todo: list[tuple[str, str, list[int]]], path: Path, max_new_tokens: int, batch_size: int
            ) -> dict[str, list[dict[str, str]]]:
    """Greedy answers for (id, text, prompt ids) in batches with left padding, appended to `path` per batch."""
    from featspec.models.tokens import eos_token_ids

    tok, model = lm.tokenizer, lm.model
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    made = {}
    bar = tqdm(total=len(todo), desc="regenerate answers", unit="conv", dynamic_ncols=True)
    with path.open("a") as fh:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            width = max(len(r[2]) for r in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros_like(x)
            for j, (_, _, ids) in enumerate(chunk):
                x[j, width - len(ids):] = torch.tensor(ids)
                att[j, width - len(ids):] = 1
            out = model.generate(x.to(lm.device), attention_mask=att.to(lm.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos or None, pad_token_id=pad)
            for j, (cid, text, _) in enumerate(chunk):
                answer = tok.decode(out[j, width:], skip_special_tokens=True).strip()
                if answer:
                    msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
                    fh.write(json.dumps({"id": cid, "messages": msgs}) + "\n")
                    made[cid] = msgs
            fh.flush()
            bar.update(len(chunk))
    bar.close()
    return made
