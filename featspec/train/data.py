"""Training data for draft heads: ShareGPT conversations rendered with the target's chat template.

Each example is (token ids, loss mask): the mask marks assistant tokens (their content and the
end-of-turn text that follows it), since the head only drafts assistant text. The `sharegpt-heldout`
slice the benchmark uses is excluded here, by the same function that defines it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from featspec.data.sharegpt import select_conversations
from featspec.errors import FeatspecError


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token is assistant text (a position the head learns to draft)
    source: str


def render(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the conversation with the chat template, and the assistant loss mask."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for m in messages:
        start = text.find(m["content"], cursor)
        if start < 0:
            raise ValueError("chat template altered a message; cannot locate assistant text")
        end = start + len(m["content"])
        cursor = end
        if m["role"] == "assistant":
            nxt = text.find("\n", end)  # include the end-of-turn marker that follows the content
            spans.append((start, nxt + 1 if 0 <= nxt - end < 16 else end))
    enc = tokenizer(text, add_special_tokens=not has_template, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    mask = []
    si = 0
    for a, b in enc["offset_mapping"]:
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        mask.append(int(si < len(spans) and spans[si][0] <= a < spans[si][1] and b > a))
    return list(enc["input_ids"]), mask


def render_examples(tokenizer, convs: list[tuple[str, list[dict[str, str]]]], max_conversations: int, max_length: int,
                    min_assistant_tokens: int = 8, desc: str = "tokenize") -> list[Example]:
    """Render conversations until `max_conversations` usable examples exist."""
    examples: list[Example] = []
    bar = tqdm(total=max_conversations, desc=desc, unit="conv", dynamic_ncols=True, leave=False)
    for source, msgs in convs:
        if len(examples) >= max_conversations:
            break
        try:
            ids, mask = render(tokenizer, msgs, max_length)
        except ValueError:
            continue
        if sum(mask) >= min_assistant_tokens:
            examples.append(Example(ids, mask, source))
            bar.update(1)
    bar.close()
    if not examples:
        raise FeatspecError("no usable training conversations after rendering: raise --max-length")
    return examples


def load_sharegpt(tokenizer, max_conversations: int, max_length: int, seed: int = 0,
                  heldout: bool = False, min_assistant_tokens: int = 8, skip: int = 0) -> list[Example]:
    """A seeded sample of ShareGPT training conversations (or of the held-out slice), rendered; the first
    `skip` of the seeded order are left out (e.g. the ones an --init-from head already trained on)."""
    return render_examples(tokenizer, select_conversations(seed, heldout)[skip:], max_conversations, max_length,
                           min_assistant_tokens, desc="tokenize sharegpt" + (" heldout" if heldout else ""))


def load_regenerated(lm, max_conversations: int, max_length: int, seed: int = 0, heldout: bool = False,
                     max_new_tokens: int = 320, skip: int = 0) -> list[Example]:
    """First user turns of ShareGPT answered by the target itself (cached on disk), rendered; `skip` as in
    load_sharegpt."""
    from featspec.train.regenerate import regenerate

    convs = select_conversations(seed, heldout)[skip : skip + max_conversations]
    answered = regenerate(lm, [(cid, msgs[0]["content"]) for cid, msgs in convs], max_new_tokens=max_new_tokens)
    return render_examples(lm.tokenizer, answered, max_conversations, max_length, desc="tokenize regenerated")


def draft_vocabulary(examples: list[Example], size: int, vocab_size: int, always: list[int] = ()) -> torch.Tensor:
    """The `size` most frequent target ids at loss positions (ties by id), plus `always` (e.g. EOS); sorted."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        ids = torch.tensor(ex.ids)[torch.tensor(ex.mask, dtype=torch.bool)]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    if always:  # above every counted id, in one assignment (a widened head brings thousands)
        counts[torch.tensor(list(always), dtype=torch.long)] = counts.max() + 1
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(sorted(order[:size]), dtype=torch.long)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask (B, T)."""
    t = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), t), dtype=torch.long)
    loss = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        att[i, :n] = 1
        loss[i, :n] = torch.tensor(e.mask)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def batch_order(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Deterministic batches for an epoch (a resumed run recomputes the same ones)."""
    idx = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(idx)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]
